"""Part 10's faster analysis stages give the same figures as before: every function whose
computation changed, against its previous implementation (tests/stages_reference.py) or brute force.

The stated tolerance is zero: ranks, labels, bootstrap confidences, baselines and medians are equal
to the last bit (NaN where the previous implementation gave NaN).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import stages_reference as ref
import tiny_models
import torch

from catalog.corpus import Document
from catalog.extract import ablation as abl
from catalog.extract import labels as lab
from catalog.extract import pipeline as pl
from catalog.extract.architectures import MlpView
from catalog.extract.baselines import agreement_figures
from catalog.extract.weights import token_ranks, value_logits
from catalog.extract.windows import tokenise
from catalog.runs.schemas import default_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values, NaN where the other is NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0, math.inf, -math.inf),
                                                              b.nan_to_num(0.0, math.inf, -math.inf))


# --- token ranks --------------------------------------------------------------------------------


def brute_ranks(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """1 + the number of strictly higher logits, 0 for ids < 0, by comparing with every logit."""
    target = logits.gather(1, ids.clamp(min=0))
    above = (logits.unsqueeze(1) > target.unsqueeze(2)).sum(2)
    return torch.where(ids >= 0, above + 1, 0)


@pytest.mark.parametrize("seed", range(8))
def test_token_ranks_against_previous_and_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, vocab, n = [(40, 500, 7), (64, 3000, 50), (10, 50, 60), (33, 1000, 1)][seed % 4]
    logits = torch.randn(rows, vocab, generator=g) * 10 ** (seed - 4)
    if seed % 2:
        logits = (logits * 4).round() / 4  # many ties, among logits and targets alike
    ids = torch.randint(-1, vocab, (rows, n), generator=g)
    ids[2] = -1  # a row with no target
    ids[5] = 3  # one target, many times
    logits[4] = 1.0  # a constant row
    logits[6, :vocab // 2] = logits[6, 0]  # half a row tied
    logits[7, 1] = -0.0  # a signed zero among zeros
    logits[7, 2] = 0.0
    want = ref.token_ranks(logits, ids)
    assert torch.equal(want, brute_ranks(logits, ids))
    for cells in (1, 3, 64, 4096):  # a coarse grid: most logits share a cell with a target
        for chunk in (1, 7, 64):
            assert torch.equal(token_ranks(logits, ids, chunk=chunk, cells=cells), want), (cells, chunk)


def test_token_ranks_with_infinite_and_nan_logits() -> None:
    """A non-finite logit in a chunk sends that chunk to the per-logit search: the old answer."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 300, generator=g)
    logits[1, 5], logits[3, 7], logits[3, 8], logits[9, 0] = math.inf, -math.inf, math.nan, math.inf
    ids = torch.randint(-1, 300, (12, 9), generator=g)
    ids[1, 0] = 5  # the +inf logit is a target
    for chunk in (1, 4, 12):
        assert torch.equal(token_ranks(logits, ids, chunk=chunk), ref.token_ranks(logits, ids))
    # extreme finite ranges: differences that overflow float32, and a range of one ulp
    wide = torch.tensor([[3e38, -3e38, 0.0, 1e-30, -3e38, 2e38]])
    narrow = torch.tensor([[1.0, 1.0 + 2**-23, 1.0, 1.0 - 2**-24, 1.0 + 2**-23, 5.0]])
    for x in (wide, narrow):
        ids = torch.tensor([[0, 1, 3, 1, 2]])
        assert torch.equal(token_ranks(x, ids), ref.token_ranks(x, ids))
        assert torch.equal(token_ranks(x, ids), brute_ranks(x, ids))


# --- agreement and its baselines -----------------------------------------------------------------


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_agreement_figures_against_previous_on_tiny_models(family: str) -> None:
    """The tiny seeded models' value logits (raw and folded), random next tokens with gaps."""
    model = tiny_models.build(family, seed=3)
    view = MlpView.of(model)
    e = view.unembedding().detach()
    gain = view.final_norm_gain()
    g = torch.Generator().manual_seed(7)
    for layer in range(view.n_layers):
        values = view.layer(layer).values.detach()
        logits = value_logits(values, e)
        folded = logits if gain is None else value_logits(values, e * gain)
        d, vocab = logits.shape
        next_ids = torch.randint(-1, vocab, (d, 6), generator=g)
        next_ids[0] = -1
        negative = torch.randint(-1, vocab, (d, 6), generator=g)
        counts = torch.randint(0, 9, (vocab,), generator=g)
        kw: dict[str, Any] = {"seed": 3, "layer": layer, "folded_logits": folded, "negative_next": negative}
        want = ref.agreement_figures(logits, next_ids, counts, **kw)
        got = agreement_figures(logits, next_ids, counts, **kw)
        for f in want.__dataclass_fields__:
            assert same(getattr(got, f), getattr(want, f)), (family, layer, f)


# --- medians -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_nanmedian_all_against_previous(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=int(rng.integers(1, 400))) * 10.0 ** rng.integers(-6, 6)
    if seed % 3 == 0:
        x = x.round()  # ties
    if seed % 4 == 0:
        x[rng.random(x.size) < 0.4] = math.nan
    if seed == 5:
        x[:3] = [math.inf, -math.inf, math.inf]
    for t in (torch.tensor(x), torch.tensor(x, dtype=torch.float32).view(-1, 1)):
        want, got = ref.nanmedian_all(t), abl.nanmedian_all(t)
        assert want is not None and got is not None
        assert got == want or (math.isnan(got) and math.isnan(want)), (seed, got, want)
    assert abl.nanmedian_all(torch.full((3, 2), math.nan)) is None


def test_histogram_quantiles_against_previous() -> None:
    from catalog.extract.states import ABS_BINS, histogram_quantiles

    g = torch.Generator().manual_seed(4)
    hist = torch.randint(0, 5, (40, ABS_BINS + 2), generator=g) * (torch.rand(40, ABS_BINS + 2, generator=g) < 0.1)
    hist[0] = 0  # an empty row
    hist[1, 0], hist[2, -1] = 100, 100  # mass in the underflow and overflow bins
    qs = [q / 100 for q in (50, 90, 99)] + [0.0, 1.0]
    for got, q in zip(histogram_quantiles(hist, qs), qs, strict=True):
        assert same(got, ref.histogram_quantile(hist, q)), q


# --- the label rule's bootstrap --------------------------------------------------------------------


def label_case(seed: int, d: int, n: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    contrast = torch.randn(d, n, generator=g, dtype=torch.float64)
    context = torch.randn(d, n, generator=g, dtype=torch.float64)
    if ties:
        contrast, context = (contrast * 2).round() / 2, context.round()
    dropped = torch.rand(d, n, generator=g) < torch.rand(d, 1, generator=g)  # from none to all per row
    contrast[dropped], context[dropped] = math.nan, math.nan
    return contrast, context


@pytest.mark.parametrize(("seed", "n", "bootstrap"), [(0, 50, 200), (1, 7, 17), (2, 1, 5), (3, 2, 30), (4, 13, 64)])
def test_bootstrap_confidence_against_previous(seed: int, n: int, bootstrap: int) -> None:
    contrast, context = label_case(seed, 150, n, ties=seed % 2 == 1)
    rule = lab.LabelRule(bootstrap=bootstrap, seed=seed, min_triggers=1)
    codes = lab.classify(lab._median(contrast), lab._median(context), 0.1, -0.05)
    codes[:4] = torch.tensor([0, 1, 2, -1])  # labels the medians do not give, and a null one
    assert (codes >= 0).any()
    want = ref.bootstrap_confidence(contrast, context, codes, 0.1, -0.05, rule, layer=3)
    for block in (1, 11, 64, 1000):
        got = lab.bootstrap_confidence(contrast, context, codes, 0.1, -0.05, rule, 3, block=block)
        assert same(got, want), block


def test_resample_medians_equal_nanquantile() -> None:
    """The medians read off draw counts are nanquantile's over the materialised resamples."""
    contrast, _ = label_case(5, 60, 9, ties=True)
    n = (~contrast.isnan()).sum(1)
    keep = n > 0
    contrast, n = contrast[keep], n[keep]
    # eligible values first in each row, as bootstrap_confidence orders them
    contrast = contrast.gather(1, torch.argsort(contrast.isnan().to(torch.int8), dim=1, stable=True))
    g = torch.Generator().manual_seed(0)
    idx = (torch.rand((len(n), 40, 9), generator=g, dtype=torch.float64) * n.view(-1, 1, 1)).long()
    valid = torch.arange(9).view(1, 1, 9) < n.view(-1, 1, 1)
    drawn = torch.where(valid, contrast.unsqueeze(1).expand(-1, 40, -1).gather(2, idx), math.nan)
    counts = torch.zeros((len(n), 40, 10), dtype=torch.int16)
    counts.scatter_add_(2, torch.where(valid, idx, 9), torch.ones_like(idx, dtype=torch.int16))
    got = lab._resample_median(contrast, n, counts[:, :, :9])
    assert same(got, torch.nanquantile(drawn, 0.5, dim=2))


def test_threaded_blocks_give_the_same_results() -> None:
    """With two torch threads the blocks run in worker threads (catalog.extract.blocks): the random
    draws still come in block order, and every block writes only its own rows."""
    contrast, context = label_case(9, 300, 20, ties=True)
    rule = lab.LabelRule(bootstrap=40, seed=2, min_triggers=1)
    codes = lab.classify(lab._median(contrast), lab._median(context), 0.0, 0.0)
    g = torch.Generator().manual_seed(3)
    logits, ids = torch.randn(300, 700, generator=g).round(decimals=1), torch.randint(-1, 700, (300, 12), generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        conf = lab.bootstrap_confidence(contrast, context, codes, 0.0, 0.0, rule, 1, block=7)
        ranks = token_ranks(logits, ids, chunk=5)
        with torch.inference_mode():  # as layer_records calls them: the workers write inference tensors
            inference_ranks = token_ranks(logits.clone(), ids.clone(), chunk=5)
            inference_conf = lab.bootstrap_confidence(contrast.clone(), context.clone(), codes.clone(), 0.0, 0.0,
                                                      rule, 1, block=7)
        assert torch.get_num_threads() == 2  # restored after the blocks
    finally:
        torch.set_num_threads(before)
    assert same(conf, ref.bootstrap_confidence(contrast, context, codes, 0.0, 0.0, rule, 1))
    assert torch.equal(ranks, ref.token_ranks(logits, ids)) and torch.equal(inference_ranks, ranks)
    assert same(inference_conf, conf)


# --- the stages end to end on tiny models ----------------------------------------------------------


PARAMS = default_parameters(top_n=6, window=10, batch_tokens=64, ablation_seed=3, label_min_prefix=3,
                            label_min_triggers=2, label_bootstrap=50)


def lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(tiny_models.WORDS) for _ in range(rng.randint(1, 24))) for _ in range(n)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stages_against_previous_on_tiny_models(family: str) -> None:
    """analysis_from (labels) and every layer's corpus figures, now and with the previous
    implementations patched in, on the same pass state and ablations."""
    model, tok = tiny_models.build(family, seed=2), tiny_models.tokenizer()
    view = MlpView.of(model)
    corpus = tokenise([Document(i, t) for i, t in enumerate(lines(60, 8))], tok, window=PARAMS.window)
    state = pl.pass_state(view, tok, corpus, PARAMS)
    table = abl.prefix_table(corpus, state.top, state.bottom)
    ablated, _ = pl.ablate(view, tok, corpus, table, PARAMS)
    analyses = []
    for old in (True, False):
        if old:
            with ref.previous():
                analyses.append(pl.analysis_from(view, tok, corpus, state, table, ablated, PARAMS))
        else:
            analyses.append(pl.analysis_from(view, tok, corpus, state, table, ablated, PARAMS))
    before, now = analyses
    assert before.labels is not None and now.labels is not None
    assert any(label is not None for x in now.labels for label in x.labels)
    for a, b in zip(before.labels, now.labels, strict=True):
        assert a.labels == b.labels
        assert same(a.confidence, b.confidence)
        for f in ("contrast", "context", "triggers", "scale"):
            assert same(getattr(a.inputs, f), getattr(b.inputs, f)), f
    e = view.unembedding().detach()
    gain = view.final_norm_gain()
    for layer in range(view.n_layers):
        values = view.layer(layer).values.detach()
        logits = value_logits(values, e)
        folded = logits if gain is None else value_logits(values, e * gain)
        records = []
        for old, analysis in ((True, before), (False, now)):
            record = pl.LayerRecord(layer=layer, stats={}, weights=None, keys=None, values=None,  # type: ignore[arg-type]
                                    ups=None, projection=None)  # type: ignore[arg-type]
            if old:
                with ref.previous():
                    pl._add_corpus_figures(record, logits, folded, analysis, PARAMS)
            else:
                pl._add_corpus_figures(record, logits, folded, analysis, PARAMS)
            records.append(record)
        a, b = records
        assert a.stats.keys() == b.stats.keys()
        for k, x in a.stats.items():  # floats (or None), equal to the last bit
            y = b.stats[k]
            assert x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)), k
        assert a.agreement is not None and b.agreement is not None
        for f in a.agreement.__dataclass_fields__:
            x, y = getattr(a.agreement, f), getattr(b.agreement, f)
            assert (x is None and y is None) or same(x, y), f
        assert a.ablation is not None and b.ablation is not None
        assert all(same(a.ablation[k], b.ablation[k]) for k in a.ablation)
