"""Runs made of shards (part 8): exact merge, resume after SIGKILL, attempt caps, fencing, `runs` views.

The merge is held against one pass over the whole corpus (no shards), the resumed catalogs against
an uninterrupted run's export; the database is a real Postgres, the models tiny seeded ones.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from catalog.cli import app
from catalog.config import settings
from catalog.corpus import Document
from catalog.export import records
from catalog.extract.architectures import MlpView
from catalog.extract.params import Parameters
from catalog.extract.pipeline import pass_state
from catalog.extract.states import layer_payload, pass_state_from, shard_payload
from catalog.extract.windows import tokenise
from catalog.read.catalog import current_run
from catalog.runs import lifecycle
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
from catalog.store.database import session_scope
from catalog.store.models import ExtractionRun, RunShard, RunStatus, ShardKind, ShardState

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 8
PARAMS = default_parameters(top_n=4, window=WINDOW, batch_tokens=64, ablation_seed=3, label_min_prefix=3,
                            label_min_triggers=2)


def lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = [" ".join(rng.choice(tiny_models.WORDS) for _ in range(rng.randint(1, 20))) for _ in range(n)]
    out[5] = ""  # blank lines keep later documents' numbers
    return out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(lines(120, 11)) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_encoder import save_bert

    root = tmp_path_factory.mktemp("shard-models")
    return {**{f: tiny_models.save(f, root / f, seed=5) for f in ("gpt2", "llama")},
            "bert": save_bert("BertForMaskedLM", root / "bert", seed=2)}


def assert_same_triggers(got: list[tuple[int, int, float]], want: list[tuple[int, int, float]], where: Any) -> None:
    """The same triggers in the same order, with coefficients within float32 rounding.

    Two triggers whose coefficients are equal in exact arithmetic (identical prefixes: the same first
    token of two documents) can round one ulp apart in batches padded differently, and then trade
    places, or one of them falls off the end of the top-N: that is allowed, and nothing else.
    """
    assert len(got) == len(want), where
    close = lambda a, b: abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-3)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert close(g[2], w[2]), (where, i, g, w)
        if g[:2] != w[:2]:  # swapped with a tied trigger, or one of a tie at the cut (below)
            theirs = [w2[2] for w2 in want if w2[:2] == g[:2]]
            assert all(close(v, w[2]) for v in theirs), (where, i, g, w)
    for extra in {x[:2] for x in got} ^ {x[:2] for x in want}:  # only at the cut, by a tie
        value = next(x[2] for x in [*got, *want] if x[:2] == extra)
        assert close(value, want[-1][2]), (where, extra)


# --- the merge, with no database: random partitions and fold orders --------------------------------


def bert() -> tuple[Any, Any]:
    from test_encoder import bert_tokenizer, build_bert

    return build_bert("BertForMaskedLM", 2), bert_tokenizer()


def model_and_tokenizer(family: str) -> tuple[Any, Any]:
    if family == "bert":
        return bert()
    return tiny_models.build(family, seed=4), tiny_models.tokenizer()


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def family_setup(request: pytest.FixtureRequest) -> tuple[str, MlpView, Any, list[Document], Any]:
    family = request.param
    model, tok = model_and_tokenizer(family)
    view = MlpView.of(model)
    docs = [Document(i, t) for i, t in enumerate(lines(80, 21)) if t.strip()]
    whole = pass_state(view, tok, tokenise(docs, tok, window=WINDOW, causal=view.causal), PARAMS)
    return family, view, tok, docs, whole


@hyp_settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_partition_merges_to_the_one_pass_state(
    family_setup: tuple[str, MlpView, Any, list[Document], Any], data: st.DataObject,
) -> None:
    family, view, tok, docs, whole = family_setup
    n = len(docs)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=6), label="cuts"))
    parts = [docs[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    states = []
    for part in parts:
        s = pass_state(view, tok, tokenise(part, tok, window=WINDOW, causal=view.causal), PARAMS)
        # through the stored form, as a resumed run reads it
        s = pass_state_from(shard_payload(s), [layer_payload(s, layer) for layer in range(s.n_layers)])
        states.append(s)
    order = data.draw(st.permutations(range(len(states))), label="fold order")
    merged = states[order[0]]
    for i in order[1:]:
        merged = merged.merge(states[i])

    assert merged.counts == whole.counts
    assert torch.equal(merged.token_counts, whole.token_counts)
    tops = [(merged.top, whole.top)] + ([(merged.bottom, whole.bottom)] if whole.bottom is not None else [])
    for got_list, want_list in tops:
        for got, want in zip(got_list, want_list, strict=True):
            # the same triggers in the same order (a total order), coefficients within float32
            # rounding (a shard's batches are padded to other widths)
            same = (got.documents == want.documents) & (got.positions == want.positions)
            for neuron in torch.nonzero(~same.all(dim=1)).flatten().tolist():
                def row(t: Any, n: int = neuron) -> list[tuple[int, int, float]]:
                    return list(zip(t.documents[n].tolist(), t.positions[n].tolist(), t.values[n].tolist(), strict=True))
                assert_same_triggers(row(got), row(want), (family, neuron))
            torch.testing.assert_close(got.values.cpu(), want.values.cpu(), rtol=1e-5, atol=1e-6)
            prev_same = torch.where(same, got.previous, want.previous)
            torch.testing.assert_close(prev_same.cpu(), want.previous.cpu(), rtol=1e-5, atol=1e-6, equal_nan=True)
    for got, want in zip(merged.firing, whole.firing, strict=True):
        assert got.count == want.count
        assert torch.equal(got.abs_hist.cpu(), want.abs_hist.cpu())  # counts: exactly
        assert torch.equal(got.gate_open.cpu(), want.gate_open.cpu())  # counts of x.k + b > 0
    for got, want in zip(merged.stats, whole.stats, strict=True):
        assert got.count == want.count
        assert torch.equal(got.positive.cpu(), want.positive.cpu())
        torch.testing.assert_close(got.maximum.cpu(), want.maximum.cpu(), rtol=1e-5, atol=1e-6)
        # moments: float32 batch sums folded in float64; within float32 rounding of the mean's scale
        scale = want.mean.abs().max().item() + 1.0
        np.testing.assert_allclose(got.mean.cpu().numpy(), want.mean.cpu().numpy(), atol=1e-6 * scale)
        np.testing.assert_allclose(got.m2.cpu().numpy(), want.m2.cpu().numpy(), rtol=1e-5, atol=1e-6 * scale)


def test_stats_against_float64_numpy(family_setup: tuple[str, MlpView, Any, list[Document], Any]) -> None:
    """The merged moments against an independent float64 computation over every counted coefficient."""
    _family, view, tok, docs, _whole = family_setup
    from catalog.extract.corpus_pass import batches
    from catalog.extract.hooks import backbone, capture_coefficients

    corpus = tokenise(docs, tok, window=WINDOW, causal=view.causal)
    seen: list[list[np.ndarray]] = [[] for _ in range(view.n_layers)]
    shape = [0, 0]
    current: list[Any] = []

    def on_layer(layer: int, coeffs: torch.Tensor) -> None:
        seen[layer].append(coeffs[current[0].counted].double().numpy())

    with torch.inference_mode(), capture_coefficients(view.value_projs(), on_layer, shape):
        for batch in batches(corpus, batch_tokens=64, pad=0, device=torch.device("cpu")):
            shape[:] = list(batch.input_ids.shape)
            current[:] = [batch]
            backbone(view.model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    half = len(docs) // 2
    a = pass_state(view, tok, tokenise(docs[:half], tok, window=WINDOW, causal=view.causal), PARAMS)
    b = pass_state(view, tok, tokenise(docs[half:], tok, window=WINDOW, causal=view.causal), PARAMS)
    merged = a.merge(b)
    for layer in range(view.n_layers):
        x = np.concatenate(seen[layer])
        summary = merged.stats[layer].summary()
        np.testing.assert_allclose(summary["mean"].numpy(), x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(summary["std"].numpy(), x.std(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(summary["max"].numpy(), x.max(0))


# --- whole runs: the sharded catalog equals the one-shard catalog ---------------------------------


def export_of(name: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        return [{k: v for k, v in r.items() if k not in ("run_id", "model")} for r in records(s, name)]


def assert_same_catalog(got: list[dict[str, Any]], want: list[dict[str, Any]], rtol: float = 1e-5,
                        atol: float = 1e-7) -> None:
    """Equal records: numbers within float32 rounding of float64 folds, everything else exactly."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert _close(g[key], w[key], rtol, atol), (g["layer"], g["neuron"], key, g[key], w[key])


def _close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=rtol, atol=atol))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol, atol) for k in a)
    return bool(a == b)


@pytest.fixture
def exact_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    """No start cache (ablation.StartCache), here and in child processes: the catalog then depends
    on the plan alone, bit for bit, wherever and however often its shards ran. With it, a run in
    one process reads its random ablation's window starts from the corpus pass's batches, whose
    padded widths differ from those of the starts run again (a resumed or distributed run): float32
    rounding, held by test_the_start_cache_gives_the_catalog_of_running_the_starts."""
    monkeypatch.setattr(settings, "ablation_start_cache_mb", 0)
    monkeypatch.setenv("CATALOG_ABLATION_START_CACHE_MB", "0")


def trigger_keys(rows: list[dict[str, Any]], kind: str = "triggers") -> list[Any]:
    return [[(t["document"], t["position"], t["activation"]) for t in r.get(kind) or []] for r in rows]


@pytest.mark.usefixtures("exact_placement")
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_sharded_run_equals_the_one_shard_run(migrated_db: str, models: dict[str, Path], corpus_file: Path,
                                              family: str) -> None:
    one = extract(ExtractRequest(model=str(models[family]), name=f"one-{family}", corpus=str(corpus_file),
                                 params=PARAMS, shard_tokens=10**9))
    many = extract(ExtractRequest(model=str(models[family]), name=f"many-{family}", corpus=str(corpus_file),
                                  params=PARAMS, shard_tokens=97))
    assert one.counts["shards"] == 1 and many.counts["shards"] > 5
    a, b = export_of(f"one-{family}"), export_of(f"many-{family}")
    for ra, rb in zip(a, b, strict=True):
        for kind in ("triggers", "negative_triggers"):
            assert_same_triggers(trigger_keys([rb], kind)[0], trigger_keys([ra], kind)[0], (ra["layer"], ra["neuron"]))
    def places(r: dict[str, Any]) -> list[Any]:
        return [t[:2] for kind in ("triggers", "negative_triggers") for t in trigger_keys([r], kind)[0]]

    tied = {(r["layer"], r["neuron"]) for r, q in zip(a, b, strict=True) if places(r) != places(q)}
    assert len(tied) <= len(a) // 20  # a few ties at most, not a different catalog
    assert_same_catalog([r for r in b if (r["layer"], r["neuron"]) not in tied],
                        [r for r in a if (r["layer"], r["neuron"]) not in tied])
    for key in ("tokens", "documents", "windows", "prefixes"):
        assert one.counts[key] == many.counts[key], key


# --- killed runs resume to the uninterrupted catalog ----------------------------------------------


DRIVER = """
import pathlib, sys, time
import torch
torch.set_num_threads(1)  # as the test process (one_thread): bitwise equal results need the same kernels
from catalog.runs.local import extract
from catalog.runs.schemas import ExtractRequest, default_parameters
model, corpus, name, stop_at, marker = sys.argv[1:6]
params = default_parameters(**__import__("json").loads(sys.argv[6]))
def hook(stage):
    if stage == stop_at:
        pathlib.Path(marker).write_text("reached")
        time.sleep(3600)
extract(ExtractRequest(model=model, name=name, corpus=corpus, params=params, shard_tokens=int(sys.argv[7])), on_stage=hook)
"""

PARAMS_JSON = json.dumps({"top_n": 4, "window": WINDOW, "batch_tokens": 64, "ablation_seed": 3,
                          "label_min_prefix": 3, "label_min_triggers": 2})


def kill_at(model: Path, corpus: Path, name: str, stage: str, tmp: Path, shard_tokens: int) -> None:
    """Run an extraction in a child process and SIGKILL it once it reaches ``stage``."""
    marker = tmp / f"reached-{stage.replace(' ', '-')}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(model), str(corpus), name, stage, str(marker),
                             PARAMS_JSON, str(shard_tokens)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # a stuck child, not a speed assertion
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the extraction ended before {stage!r}: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def shard_rows(engine: Engine, run_id: int) -> list[tuple[str, int, str, int]]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(select(RunShard.kind, RunShard.index, RunShard.status, RunShard.attempts)
                                            .where(RunShard.run_id == run_id).order_by(RunShard.kind, RunShard.index))]


def latest_run(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.scalar(select(ExtractionRun.id).order_by(ExtractionRun.id.desc()).limit(1)))


@pytest.mark.usefixtures("exact_placement")
@pytest.mark.parametrize("stage", ["pass shard 3", "ablation shard 1", "layer 1"],
                         ids=["mid-pass", "mid-ablation", "mid-ingest"])
def test_sigkill_then_resume_publishes_the_uninterrupted_catalog(
    engine: Engine, models: dict[str, Path], corpus_file: Path, tmp_path: Path, stage: str,
) -> None:
    shard_tokens = 120
    name = f"killed-{stage.replace(' ', '-')}"
    reference = f"reference-{stage.replace(' ', '-')}"
    extract(ExtractRequest(model=str(models["llama"]), name=reference, corpus=str(corpus_file), params=PARAMS,
                           shard_tokens=shard_tokens))
    # the catalog to be replaced: another model's, served until the resumed run publishes
    old = extract(ExtractRequest(model=str(models["gpt2"]), name=name, corpus=str(corpus_file), params=PARAMS,
                                 shard_tokens=shard_tokens))
    old_export = export_of(name)

    kill_at(models["llama"], corpus_file, name, stage, tmp_path, shard_tokens)
    killed = latest_run(engine)
    assert lifecycle.reap_stale_runs(engine) == [killed] or shard_rows(engine, killed)
    with session_scope() as s:
        assert current_run(s, name)[1].id == old.run_id  # the old catalog is still the one served
        assert s.get(ExtractionRun, killed).status == RunStatus.interrupted
    assert export_of(name) == old_export
    before = shard_rows(engine, killed)
    done_before = [(k, i) for k, i, status, _a in before if status == "done"]
    if stage.startswith("pass"):
        assert [i for k, i in done_before if k == "pass"] == [0, 1, 2]
    assert done_before  # there is something to reuse

    result = CliRunner().invoke(app, ["runs", "resume", str(killed)])
    assert result.exit_code == 0, result.stderr
    assert f"reused {len(done_before)} finished shard(s)" in result.stderr
    after = shard_rows(engine, killed)
    assert {(k, i) for k, i, _s, _a in before} <= {(k, i) for k, i, _s, _a in after}
    for kind, index, status, attempts in after:
        # every shard ran exactly once: the finished ones were not recomputed after the kill
        assert (status, attempts) == ("done", 1), (kind, index)
    with session_scope() as s:
        assert current_run(s, name)[1].id == killed
        assert s.scalar(select(ShardState.run_id).where(ShardState.run_id == killed).limit(1)) is None
    got, want = export_of(name), export_of(reference)
    diffs = [(g["layer"], g["neuron"], k, g[k], w[k]) for g, w in zip(got, want, strict=True) for k in w if g[k] != w[k]]
    assert not diffs, diffs[:5]  # the uninterrupted run's catalog, exactly


def test_the_start_cache_gives_the_catalog_of_running_the_starts(
    engine: Engine, models: dict[str, Path], corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run in one process reads its random ablation's window starts from its corpus pass
    (ablation.StartCache); the catalog is the one of a run that runs them (the cache off), and the
    one of a run resumed after a SIGKILL mid-ablation (whose reused pass shards kept nothing), to
    float32 rounding; the starts' tokens are not run."""
    req = ExtractRequest(model=str(models["llama"]), name="starts-kept", corpus=str(corpus_file), params=PARAMS,
                         shard_tokens=120)
    kept = extract(req)
    assert kept.counts["start_cache_windows"] > 20
    name = "starts-resumed"
    kill_at(models["llama"], corpus_file, name, "ablation shard 1", tmp_path, 120)
    killed = latest_run(engine)
    lifecycle.reap_stale_runs(engine)
    result = CliRunner().invoke(app, ["runs", "resume", str(killed)])
    assert result.exit_code == 0, result.stderr
    monkeypatch.setattr(settings, "ablation_start_cache_mb", 0)
    ran = extract(ExtractRequest(**{**req.__dict__, "name": "starts-run"}))
    assert "start_cache_windows" not in ran.counts
    assert kept.counts["ablation_tokens"] < ran.counts["ablation_tokens"]
    want = export_of("starts-run")
    got = export_of("starts-kept")
    assert got != want  # read from the pass's batches, not bit for bit the starts run again ...
    assert_same_catalog(got, want, rtol=1e-4, atol=1e-6)  # ... but to float32 rounding
    assert_same_catalog(export_of(name), want, rtol=1e-4, atol=1e-6)


# --- failing shards, fencing, cancel ---------------------------------------------------------------


def test_a_shard_that_always_fails_fails_the_run_after_the_attempt_cap(
    engine: Engine, models: dict[str, Path], corpus_file: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "always-fails"
    old = extract(ExtractRequest(model=str(models["gpt2"]), name=name, corpus=str(corpus_file), params=PARAMS,
                                 shard_tokens=150))
    old_export = export_of(name)
    from catalog.runs import sharded

    real = sharded.pass_state
    calls: list[int] = []

    def failing(view: Any, tok: Any, corpus: Any, params: Parameters, progress: Any = None, starts: Any = None) -> Any:
        if 30 in corpus.documents:  # the shard holding document 30 runs out of memory every time
            calls.append(1)
            raise RuntimeError("CUDA out of memory (injected)")
        return real(view, tok, corpus, params, progress, starts)

    monkeypatch.setattr(sharded, "pass_state", failing)
    with pytest.raises(lifecycle.ShardFailed, match="CUDA out of memory"):
        extract(ExtractRequest(model=str(models["llama"]), name=name, corpus=str(corpus_file), params=PARAMS,
                               shard_tokens=150))
    assert len(calls) == settings.shard_max_attempts
    run_id = latest_run(engine)
    with session_scope() as s:
        run = s.get(ExtractionRun, run_id)
        assert run is not None and run.status == RunStatus.failed
        assert "CUDA out of memory" in (run.error or "")
        failed = s.execute(select(RunShard).where(RunShard.run_id == run_id, RunShard.status == "failed")).scalars().all()
        assert len(failed) == 1 and failed[0].attempts == settings.shard_max_attempts
        assert "CUDA out of memory" in (failed[0].error or "")
        assert current_run(s, name)[1].id == old.run_id
    assert export_of(name) == old_export


def test_a_stale_lease_cannot_write(engine: Engine, models: dict[str, Path], corpus_file: Path) -> None:
    run = extract(ExtractRequest(model=str(models["gpt2"]), name="lease", corpus=str(corpus_file), params=PARAMS,
                                 shard_tokens=200))
    # a fresh shard row of that run to fight over
    with engine.begin() as c:
        c.execute(text("INSERT INTO run_shards (run_id, kind, index, doc_start, doc_stop, tokens) "
                       "VALUES (:r, 'ablation', 999, 0, 1, 1)"), {"r": run.run_id})
    shard = next(s for s in lifecycle.shards(engine, run.run_id, ShardKind.ablation) if s.index == 999)
    first = lifecycle.claim(engine, shard, "old-holder", lease_s=0.2, max_attempts=5)
    with pytest.raises(lifecycle.StaleLease):  # a live lease is not taken over
        lifecycle.claim(engine, shard, "new-holder", lease_s=60, max_attempts=5)
    time.sleep(0.4)  # the old holder's lease runs out (it stalled)
    second = lifecycle.claim(engine, shard, "new-holder", lease_s=60, max_attempts=5)
    assert second == first + 1
    assert not lifecycle.renew(engine, shard, first, lease_s=60, done_tokens=1)
    lifecycle.complete(engine, shard, second, {0: b"new"}, 1.0)
    with pytest.raises(lifecycle.StaleLease):  # the stale holder's late write is refused
        lifecycle.complete(engine, shard, first, {0: b"old"}, 1.0)
    with engine.connect() as c:
        assert c.scalar(select(ShardState.payload).where(ShardState.run_id == run.run_id,
                                                          ShardState.index == 999)) == b"new"


def test_cancel_stops_a_run_for_good(engine: Engine, models: dict[str, Path], corpus_file: Path) -> None:
    name = "cancelled"
    old = extract(ExtractRequest(model=str(models["gpt2"]), name=name, corpus=str(corpus_file), params=PARAMS,
                                 shard_tokens=150))

    def hook(stage: str) -> None:
        if stage == "pass shard 1":
            result = CliRunner().invoke(app, ["runs", "cancel", str(latest_run(engine))])
            assert result.exit_code == 0 and "cancelled (it was running)" in result.stdout

    with pytest.raises(lifecycle.RunCancelled):
        extract(ExtractRequest(model=str(models["llama"]), name=name, corpus=str(corpus_file), params=PARAMS,
                               shard_tokens=150), on_stage=hook)
    run_id = latest_run(engine)
    with session_scope() as s:
        assert s.get(ExtractionRun, run_id).status == RunStatus.cancelled
        assert current_run(s, name)[1].id == old.run_id
    result = CliRunner().invoke(app, ["runs", "resume", str(run_id)])
    assert result.exit_code == 1 and "only an interrupted or failed run resumes" in result.stderr


def test_runs_json_views(engine: Engine, models: dict[str, Path], corpus_file: Path) -> None:
    run = extract(ExtractRequest(model=str(models["gpt2"]), name="views", corpus=str(corpus_file), params=PARAMS,
                                 shard_tokens=150))
    listed = [json.loads(line) for line in CliRunner().invoke(app, ["runs", "--json"]).stdout.splitlines()]
    mine = next(r for r in listed if r["run_id"] == run.run_id)
    assert mine["status"] == "complete" and mine["shards_done"] == mine["shards_total"] > 2
    shown = json.loads(CliRunner().invoke(app, ["runs", "show", str(run.run_id), "--json"]).stdout)
    passes = [s for s in shown["shards"] if s["kind"] == "pass"]
    assert [s["index"] for s in passes] == list(range(run.counts["shards"]))
    assert all(s["status"] == "done" and s["attempts"] == 1 for s in shown["shards"])
    assert sum(s["tokens"] for s in passes) == run.counts["tokens"] == shown["plan"]["tokens"]
    # documents in corpus order, no gap and no overlap
    assert all(a["doc_stop"] == b["doc_start"] for a, b in itertools.pairwise(passes))
    # each pass shard seeks to its first document's line instead of reading the file from the start
    data = corpus_file.read_bytes()
    with engine.connect() as c:
        offsets = c.execute(select(RunShard.doc_start, RunShard.byte_offset).where(
            RunShard.run_id == run.run_id, RunShard.kind == "pass").order_by(RunShard.index)).all()
    assert offsets[0] == (0, 0) and len({o for _d, o in offsets}) == len(offsets)
    for doc_start, offset in offsets:
        assert data[offset:].split(b"\n", 1)[0].decode() == lines(120, 11)[doc_start]
        assert offset == 0 or data[offset - 1 : offset] == b"\n"
    text_out = CliRunner().invoke(app, ["runs", "show", str(run.run_id)]).stdout
    assert "plan:" in text_out and "pass" in text_out
    missing = CliRunner().invoke(app, ["runs", "show", "999999"])
    assert missing.exit_code == 1 and missing.stderr.strip().startswith("error: no run 999999")


def test_a_live_shard_keeps_its_lease(engine: Engine, models: dict[str, Path], corpus_file: Path) -> None:
    """The holder's thread renews its lease while the shard runs, so nobody takes a live shard over."""
    from catalog.runs.sharded import Lease

    run = extract(ExtractRequest(model=str(models["gpt2"]), name="renewed", corpus=str(corpus_file), params=PARAMS,
                                 shard_tokens=400))
    with engine.begin() as c:
        c.execute(text("INSERT INTO run_shards (run_id, kind, index, doc_start, doc_stop, tokens) "
                       "VALUES (:r, 'ablation', 998, 0, 1, 1)"), {"r": run.run_id})
    shard = next(s for s in lifecycle.shards(engine, run.run_id, ShardKind.ablation) if s.index == 998)
    attempt = lifecycle.claim(engine, shard, "busy-holder", lease_s=0.6, max_attempts=3)
    with Lease(engine, shard, attempt, 0.6) as lease:
        lease.done = 7
        time.sleep(1.5)  # more than two leases: alive only because the thread renewed it
        with pytest.raises(lifecycle.StaleLease, match="held by busy-holder"):
            lifecycle.claim(engine, shard, "thief", lease_s=60, max_attempts=3)
    with engine.connect() as c:
        done = c.scalar(select(RunShard.done_tokens).where(RunShard.run_id == run.run_id, RunShard.index == 998,
                                                           RunShard.kind == "ablation"))
    assert done == 7 and not lease.lost


def test_runs_show_a_live_run(engine: Engine, models: dict[str, Path], corpus_file: Path) -> None:
    """While a run goes on, `runs show --json` has its shards, tokens done, a rate and an ETA."""
    seen: list[dict[str, Any]] = []

    def hook(stage: str) -> None:
        if stage == "pass shard 2":
            out = CliRunner().invoke(app, ["runs", "show", str(latest_run(engine)), "--json"])
            assert out.exit_code == 0, out.stderr
            seen.append(json.loads(out.stdout))

    run = extract(ExtractRequest(model=str(models["llama"]), name="live-view", corpus=str(corpus_file), params=PARAMS,
                                 shard_tokens=150), on_stage=hook)
    (live,) = seen
    assert live["run_id"] == run.run_id and live["status"] == "running" and live["step"] == "pass"
    passes = [s for s in live["shards"] if s["kind"] == "pass"]
    assert [s["status"] for s in passes[:3]] == ["done", "done", "pending"]
    assert live["tokens_done"] == passes[0]["tokens"] + passes[1]["tokens"] < live["tokens_total"]
    assert live["tokens_per_s"] > 0 and live["eta_s"] > 0
