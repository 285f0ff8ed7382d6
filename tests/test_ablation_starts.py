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

from catalog.corpus import Document
from catalog.extract import ablation as abl
from catalog.extract import pipeline
from catalog.extract.architectures import MlpView
from catalog.extract.params import Parameters
from catalog.extract.windows import TokenisedCorpus, tokenise

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


def _documents() -> list[Document]:
    rng = np.random.default_rng(7)
    return [Document(i, " ".join(rng.choice(tiny_models.WORDS, size=int(rng.integers(2, 71))).tolist()))
            for i in range(40)]


def _corpus_and_view(family: str, bos: bool) -> tuple[torch.nn.Module, MlpView, object, TokenisedCorpus]:
    """Documents of 2-70 random words in windows of 24 (overlapping windows after a document's first)."""
    model = tiny_models.build(family, seed=5)
    tok = tiny_models.tokenizer(bos=bos)
    return model, MlpView.of(model), tok, tokenise(_documents(), tok, window=24, bos="auto" if bos else "none")


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
@pytest.mark.parametrize("bos", [True, False])
def test_starts_kept_by_the_corpus_pass(family: str, bos: bool) -> None:
    """The random ablation reading its windows' starts from the corpus pass's cache (StartCache)
    gives the coefficients of running the starts itself, and of each row run alone; the pass
    itself is unchanged by keeping them; a budget keeps some windows and the rest run as before."""
    model, view, tok, corpus = _corpus_and_view(family, bos)
    params = Parameters(top_n=6, window=24, batch_tokens=300, bos="auto" if bos else "none")
    plain = pipeline.pass_state(view, tok, corpus, params)
    starts = pipeline.start_cache(view, params, 1 << 30)
    assert starts is not None
    kept = pipeline.pass_state(view, tok, corpus, params, starts=starts)
    for a, b in zip(plain.top, kept.top, strict=True):  # the same pass, bit for bit
        assert torch.equal(a.values, b.values) and torch.equal(a.positions, b.positions)
    assert len(starts) > 10 and not starts.full
    table = abl.prefix_table(corpus, plain.top, plain.bottom)
    ids = torch.cat([i.flatten() for i in table.top_ids])
    job = abl.ablation_jobs(corpus, table, ids, seed=params.ablation_seed)["random"]
    lead = 1 if bos else 0
    cached = job.cached(starts, lead)
    assert cached == set(job.window or []), "every window with a random row was kept"

    ran, ran_cached = [0], [0]
    want, n_want = pipeline.ablate(view, tok, corpus, table, params,
                                   progress=lambda _s, n, _t: ran.__setitem__(0, ran[0] + n))
    got, n_got = pipeline.ablate(view, tok, corpus, table, params, starts=starts,
                                 progress=lambda _s, n, _t: ran_cached.__setitem__(0, ran_cached[0] + n))
    # what ran: the same but each window's start (and its lead)
    n_starts = sum(job.longest_starts().values())
    assert n_want - n_got == n_starts > 0
    assert ran[0] - ran_cached[0] == n_starts + lead * len(cached)
    for layer in range(len(table.top_ids)):
        assert torch.equal(got["first"][layer].isnan(), want["first"][layer].isnan())
        np.testing.assert_array_equal(got["first"][layer].numpy(), want["first"][layer].numpy())
        g, w = got["random"][layer], want["random"][layer]
        assert torch.equal(g.isnan(), w.isnan()) and (~g.isnan()).sum() > 0
        scale = float(w.nan_to_num().abs().max())
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-5 * scale, err_msg=f"layer {layer}")

    # each random row alone, through the plain model: the cached path against an independent run
    n = len(table)
    alone = _alone(model, view, job, [BOS] if bos else [], n)
    for layer, ids_l in enumerate(table.top_ids):
        hit = ids_l >= 0
        pids = ids_l[hit]
        a = alone[layer][torch.arange(view.d_mlp).unsqueeze(1).expand_as(ids_l)[hit].numpy(), pids.numpy()]
        g = got["random"][layer][hit].double().numpy()
        ok = ~np.isnan(a)  # prefixes read from the 'first' run or too short have no row here
        assert ok.sum() > 0
        scale = float(np.abs(a[ok]).max())
        np.testing.assert_allclose(g[ok], a[ok], rtol=1e-4, atol=1e-5 * scale, err_msg=f"layer {layer}")

    # a budget for about a third of the starts: those windows read them, the rest run theirs
    small = pipeline.start_cache(view, params, starts.used // 3)
    assert small is not None
    pipeline.pass_state(view, tok, corpus, params, starts=small)
    assert small.full and 0 < len(small) < len(starts)
    part = job.cached(small, lead)
    assert 0 < len(part) < len(cached)
    mixed, n_mixed = pipeline.ablate(view, tok, corpus, table, params, starts=small)
    assert n_mixed == n_got + sum(k for w, k in job.longest_starts().items() if w not in part)
    for layer in range(len(table.top_ids)):
        w = want["random"][layer]
        scale = float(w.nan_to_num().abs().max())
        np.testing.assert_allclose(mixed["random"][layer].numpy(), w.numpy(), rtol=1e-4, atol=1e-5 * scale)


def test_starts_kept_after_a_read_are_read_too() -> None:
    """A pass shard's starts kept after an ablation read the cache (packed it) are read like the rest."""
    _, view, tok, corpus = _corpus_and_view("llama", True)
    params = Parameters(top_n=6, window=24, batch_tokens=300)
    docs = _documents()
    one = pipeline.start_cache(view, params, 1 << 30)
    two = pipeline.start_cache(view, params, 1 << 30)
    assert one is not None and two is not None
    pipeline.pass_state(view, tok, corpus, params, starts=one)
    state = pipeline.pass_state(view, tok, tokenise(docs[:20], tok, window=24), params, starts=two)
    table = abl.prefix_table(corpus, state.top, None)
    pipeline.ablate(view, tok, corpus, table, params, starts=two)  # reads: packs the first half's starts
    pipeline.pass_state(view, tok, tokenise(docs[20:], tok, window=24), params, starts=two)
    assert len(two) == len(one)
    full = pipeline.pass_state(view, tok, corpus, params)
    table = abl.prefix_table(corpus, full.top, None)
    a, n_a = pipeline.ablate(view, tok, corpus, table, params, starts=one)
    b, n_b = pipeline.ablate(view, tok, corpus, table, params, starts=two)
    assert n_a == n_b
    for x, y in zip(a["random"], b["random"], strict=True):
        np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=1e-4, atol=1e-6)
