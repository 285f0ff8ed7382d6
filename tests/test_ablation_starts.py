"""Random-removal ablation rows that share their window's start through the key-value cache.

``run_ablation`` runs each window's start once and every row from its removed index on, over the
cached keys and values (ablation.py, ``_run_from_starts``). Held here against each row run alone,
in full, through the plain model with a hook of the test's own: every family, with and without a
BOS lead, windows long enough that the starts, the suffixes and their padding differ in width,
and a batch size that splits both the starts and the suffixes into several batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch

from catalog.extract import ablation as abl
from catalog.extract.architectures import MlpView

BOS = 1


def _job(seed: int, n_windows: int) -> abl.AblationJob:
    """Windows of 12-60 tokens; per window the rows of its removal chain, read at every index from
    the removed one on (as ``ablation_jobs`` builds them), each read its own prefix id."""
    rng = np.random.default_rng(seed)
    job = abl.AblationJob([], [], [], [], [])
    pid = 0
    for w in range(n_windows):
        tokens = rng.integers(4, 4 + len(tiny_models.WORDS), size=int(rng.integers(12, 61))).tolist()
        chain = [r for r in abl.random_chain(seed, w, 0, len(tokens)) if r > 0]
        bound = len(tokens) - 1
        for r in chain:
            end = int(rng.integers(r + 1, bound + 1))  # the row's last read, as index into the row
            reads = []
            for t in range(r, end + 1):
                reads.append((pid, t))
                pid += 1
            job.rows.append(tokens[:r] + tokens[r + 1 : end + 2])
            job.reads.append(reads)
            job.window.append(w)  # type: ignore[union-attr]
            job.kept.append(r)  # type: ignore[union-attr]
            bound = r
    return job


def _alone(model: torch.nn.Module, view: MlpView, job: abl.AblationJob, lead: list[int], n: int) -> list[np.ndarray]:
    """Per layer [d_mlp, n]: each read's coefficients from its row run by itself."""
    out = [np.full((view.d_mlp, n), np.nan, dtype=np.float64) for _ in view.value_projs()]
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
               for i, m in enumerate(view.value_projs())]
    try:
        with torch.no_grad():
            for row, reads in zip(job.rows, job.reads, strict=True):
                model(input_ids=torch.tensor([lead + row]))
                for layer, x in seen.items():
                    x = x.reshape(1, len(lead) + len(row), -1)[0]
                    for p, t in reads:
                        out[layer][:, p] = x[t + len(lead)].double().numpy()
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
@pytest.mark.parametrize("bos", [True, False])
def test_rows_from_shared_starts_equal_rows_alone(family: str, bos: bool) -> None:
    model = tiny_models.build(family, seed=3)
    view = MlpView.of(model)
    assert abl.shares_starts(model)
    job = _job(seed=11, n_windows=9)
    n = sum(len(r) for r in job.reads)
    lead = [BOS] if bos else []
    prefix_ids = [torch.arange(n).expand(view.d_mlp, n).contiguous() for _ in view.value_projs()]
    ran: list[int] = []
    got = abl.run_ablation(model, view.value_projs(), job, prefix_ids, n_prefixes=n, bos=BOS if bos else None, pad=0,
                           batch_tokens=150, progress=ran.append)
    want = _alone(model, view, job, lead, n)
    scale = max(float(np.abs(w).max()) for w in want)
    for layer, (g, w) in enumerate(zip(got, want, strict=True)):
        assert not torch.isnan(g).any(), f"layer {layer}: a read was not filled"
        np.testing.assert_allclose(g.double().numpy(), w, rtol=1e-4, atol=1e-5 * scale, err_msg=f"layer {layer}")
    # what ran: each window's longest start once, every row from its removed index on (lead per start)
    starts = {w: max(k for w2, k in zip(job.window, job.kept, strict=True) if w2 == w) for w in set(job.window)}
    assert sum(ran) == job.tokens(shared=True) + len(lead) * len(starts)
    assert job.tokens(shared=True) == sum(starts.values()) + sum(len(r) - k for r, k in zip(job.rows, job.kept, strict=True))
    assert job.tokens(shared=True) < job.tokens(shared=False)


def test_sliding_window_models_run_rows_in_full() -> None:
    """A sliding-window cache keeps only the last tokens, so its slices are not the window's start."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=8)
    assert not abl.shares_starts(MistralForCausalLM(cfg))
    cfg.sliding_window = None
    assert abl.shares_starts(MistralForCausalLM(cfg))
