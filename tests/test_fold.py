"""The corpus pass's compiled CPU fold (catalog/extract/fold.py) against the torch path it replaces on CPU
(still the CUDA path) and against numpy in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_models
import torch

from catalog.corpus import Document
from catalog.extract.architectures import MlpView
from catalog.extract.corpus_pass import corpus_pass
from catalog.extract.fold import count_positive, fold, merge_top
from catalog.extract.states import FiringStats, RunningStats, TopState, masked_extremes
from catalog.extract.windows import tokenise


def _torch_path(coeffs: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, ...]:
    keep = counted.unsqueeze(-1)
    masked = torch.where(keep, coeffs, -math.inf)
    best, at = masked_extremes(masked)
    fire = FiringStats.empty(coeffs.shape[2], coeffs.device)
    fire.add_masked(masked, counted)
    masked.masked_fill_(~keep, math.inf)
    low, low_at = masked_extremes(masked, lowest=True)
    return best, at, low, low_at, fire.abs_hist


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    rows, width, d = 5, 37, 300  # d not a multiple of the block: a short last block
    base = torch.randn(rows, width, d, generator=g) * torch.rand(d, generator=g) * 4
    counted = torch.rand(rows, width, generator=g) > 0.2
    counted[0, 0] = False  # the first position uncounted: the shift comes from a later one
    counted[3] = False  # a row with nothing counted: -inf / +inf at position 0, as torch.max gives
    ties = base.clone()
    ties[:, 0:36:3] = ties[:, 1:36:3]  # equal extremes in pairs of positions: the first one wins
    ties[1, :, :10] = 0.0  # zeros, -0.0 and tiny values: the histogram's lowest bin
    ties[1, 5:, :5] = -0.0
    ties[2, :, 20:30] = 1e-30
    ties[4, 0, 40:50] = 1e5  # above the top bin (2^14)
    shifted = 1e4 + base * 1e-3  # a large mean and a small spread: no cancellation in the moments
    return [("random", base, counted), ("ties and edges", ties, counted), ("large mean", shifted, counted)]


@pytest.mark.parametrize("name", ["random", "ties and edges", "large mean"])
def test_the_fold_equals_the_torch_path_and_numpy(name: str) -> None:
    _, coeffs, counted = next(c for c in _cases() if c[0] == name)
    f = fold(coeffs, counted, lowest=True, histogram=True)
    best, at, low, low_at, hist = _torch_path(coeffs, counted)
    assert torch.equal(f.best, best) and torch.equal(f.at, at)
    assert f.low is not None and f.low_at is not None and torch.equal(f.low, low) and torch.equal(f.low_at, low_at)
    assert f.hist is not None and torch.equal(f.hist, hist)

    kept = coeffs.numpy()[counted.numpy()].astype(np.float64)  # [n, d]: the counted positions
    assert f.count == len(kept)
    np.testing.assert_allclose(f.mean.numpy(), kept.mean(0), rtol=1e-12, atol=1e-12)
    m2 = ((kept - kept.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(f.m2.numpy(), m2, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(f.positive.numpy(), (kept > 0).sum(0))
    # the torch path's float32 moments agree to their own rounding
    stats = RunningStats.empty(coeffs.shape[2], coeffs.device)
    stats.update(coeffs, counted, best)
    np.testing.assert_allclose(stats.mean.numpy(), f.mean.numpy(), rtol=1e-6, atol=1e-6 * float(np.abs(kept).max()))
    np.testing.assert_allclose(stats.m2.numpy(), f.m2.numpy(), rtol=1e-3, atol=1e-9 * float(m2.max()))
    np.testing.assert_array_equal(stats.positive.numpy(), f.positive.numpy())
    assert count_positive(coeffs, counted).tolist() == (kept > 0).sum(0).tolist()


def test_the_fold_leaves_out_what_is_not_asked_and_takes_bfloat16() -> None:
    _, coeffs, counted = _cases()[0]
    half = coeffs.bfloat16()
    f = fold(half, counted, lowest=False, histogram=False)
    assert f.low is None and f.low_at is None and f.hist is None
    best, at, *_ = _torch_path(half.float(), counted)
    assert torch.equal(f.best, best) and torch.equal(f.at, at)


def test_nothing_counted_gives_an_empty_fold() -> None:
    coeffs = torch.randn(2, 4, 9)
    f = fold(coeffs, torch.zeros(2, 4, dtype=torch.bool), lowest=True, histogram=True)
    assert f.count == 0 and f.hist is not None and int(f.hist.sum()) == 0 and float(f.positive.sum()) == 0
    assert torch.isneginf(f.best).all() and torch.isposinf(f.low).all()  # type: ignore[arg-type]


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_a_corpus_pass_folds_the_same_compiled_or_through_torch(family: str) -> None:
    """The whole corpus pass on a tiny model, its fold compiled (CPU) or the torch operations (as on CUDA):
    the same triggers, counts and histograms, and the moments to float32 rounding."""
    model, tok = tiny_models.build(family, seed=3), tiny_models.tokenizer()
    view = MlpView.of(model)
    rng = np.random.default_rng(2)
    docs = [Document(i, " ".join(rng.choice(tiny_models.WORDS, size=int(rng.integers(1, 40)))))
            for i in range(60)]
    corpus = tokenise(docs, tok, window=16, causal=view.causal)
    runs = [corpus_pass(view.model, view.value_projs(), corpus, top_n=5, gated=view.gated, batch_tokens=96,
                        pad=0, key_projs=view.key_projs(), compiled=c) for c in (True, False)]
    fused, reference = runs
    assert fused.tokens == reference.tokens > 500
    for layer in range(len(view.value_projs())):
        for a, b in [(fused.top[layer], reference.top[layer]),
                     *([(fused.bottom[layer], reference.bottom[layer])] if fused.bottom and reference.bottom else [])]:
            assert torch.equal(a.values, b.values) and torch.equal(a.documents, b.documents)
            assert torch.equal(a.positions, b.positions) and torch.equal(a.previous.isnan(), b.previous.isnan())
            assert torch.equal(a.previous.nan_to_num(), b.previous.nan_to_num())
        f, r = fused.stats[layer], reference.stats[layer]
        assert f.count == r.count and torch.equal(f.positive, r.positive) and torch.equal(f.maximum, r.maximum)
        torch.testing.assert_close(f.mean, r.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.m2, r.m2, rtol=1e-4, atol=1e-6)
        assert fused.firing[layer].count == reference.firing[layer].count
        assert torch.equal(fused.firing[layer].abs_hist, reference.firing[layer].abs_hist)
        assert torch.equal(fused.firing[layer].gate_open, reference.firing[layer].gate_open)


def test_merge_top_equals_the_states_merge_with_ties_and_empty_slots() -> None:
    """Batches of candidates merged into one state in place (merge_top) or by TopState.merge's top-k over
    both: the same values, documents, positions and previous coefficients, in the same order; ties
    (equal values, +0.0 and -0.0, -inf for a document with nothing counted) go to the lower document."""
    g = torch.Generator().manual_seed(11)
    d, n = 70, 6
    fast, slow = TopState.empty(d, n, torch.device("cpu")), TopState.empty(d, n, torch.device("cpu"))
    doc = 0
    for batch in range(9):
        m = int(torch.randint(1, 12, (1,), generator=g))
        values = torch.randint(-3, 4, (m, d), generator=g).float() / 2  # few distinct values: many ties
        values[values == 0] = torch.where(torch.rand(int((values == 0).sum()), generator=g) > 0.5, 0.0, -0.0)
        values[0, :5] = -math.inf
        docs = torch.arange(doc, doc + m)[torch.randperm(m, generator=g)]  # documents in any order
        doc += m
        positions = torch.randint(0, 50, (m, d), generator=g)
        previous = torch.randn(m, d, generator=g)
        previous[previous > 1.5] = math.nan
        cand = TopState(values.T, docs.unsqueeze(0).expand(d, -1), positions.T, previous.T)
        slow = slow.merge(cand)
        merge_top(fast, cand)
        assert torch.equal(fast.values, slow.values) and torch.equal(fast.documents, slow.documents), batch
        assert torch.equal(fast.positions, slow.positions)
        assert torch.equal(fast.previous.nan_to_num(7.0), slow.previous.nan_to_num(7.0))
        assert torch.equal(torch.signbit(fast.values), torch.signbit(slow.values))


def test_a_bfloat16_corpus_pass_folds_the_same_compiled_or_through_torch() -> None:
    """A bfloat16 model (part 2's --dtype bfloat16; numpy has no bfloat16): the compiled fold and merge
    keep the triggers and counts of the torch operations."""
    model, tok = tiny_models.build("llama", seed=5), tiny_models.tokenizer()
    view = MlpView.of(model.to(torch.bfloat16))
    rng = np.random.default_rng(4)
    docs = [Document(i, " ".join(rng.choice(tiny_models.WORDS, size=int(rng.integers(1, 40))))) for i in range(40)]
    corpus = tokenise(docs, tok, window=16, causal=view.causal)
    fused, reference = (corpus_pass(view.model, view.value_projs(), corpus, top_n=5, gated=view.gated,
                                    batch_tokens=96, pad=0, key_projs=view.key_projs(), compiled=c)
                        for c in (True, False))
    assert fused.tokens == reference.tokens > 300
    for layer in range(len(view.value_projs())):
        assert fused.bottom is not None and reference.bottom is not None
        for a, b in [(fused.top[layer], reference.top[layer]), (fused.bottom[layer], reference.bottom[layer])]:
            assert torch.equal(a.values, b.values.float()) and torch.equal(a.documents, b.documents)
            assert torch.equal(a.positions, b.positions)
        assert torch.equal(fused.stats[layer].positive, reference.stats[layer].positive)
        assert torch.equal(fused.firing[layer].abs_hist, reference.firing[layer].abs_hist)
