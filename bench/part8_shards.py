"""Part 8 benchmark: runs made of shards against the in-process run as it was before part 8.

    nice -n 10 .venv/bin/python bench/part8_shards.py [--tokens 30000] [--reps 3] [--before /tmp/nc-before]

One random, seeded GPT-2 (``--layers`` x ``--d-mlp``, a byte-level BPE tokenizer trained on the
corpus) over the first ``--tokens`` tokens of ``data/wordnet.txt`` (written out as a corpus file of
whole documents, so both code paths read exactly that file). Every extraction runs in a fresh
subprocess (the timed span is the ``extract``/``resume`` call alone; the process's peak RSS comes
with it), against one embedded Postgres holding two databases: one migrated by this tree, one by
the pre-part-8 tree (``git worktree add /tmp/nc-before e604f92``, run with PYTHONPATH pointing at it).

Measured in this one run:
1. end to end: the pre-part-8 ``catalog.service.extract`` vs ``catalog.runs.local.extract`` with one
   pass shard (shard_tokens = all tokens) and with 8 (the smallest shard_tokens that plans 8);
   ``--reps`` repetitions each, the order alternating; medians and ratios to the pre-part-8 run
   (target: 8 shards <= 1.05);
2. a run of 8 shards interrupted at "pass shard 4" (KeyboardInterrupt from ``on_stage``), then
   ``resume`` in a new process: its time against a full 8-shard run, and the shards it reused;
3. a pass shard's state per layer: ``run_shards.state_bytes`` / n_layers, each stored layer payload
   (``layer_payload``) of the interrupted run, and a synthetic GPT-2-XL-sized state (d_mlp 6400,
   top_n 50) filled as a shard of ``--xl-shard-tokens`` tokens would be;
4. peak RSS of the extracting process at the corpus of ``--tokens`` and at 4x that, with the 8-shard
   shard_tokens fixed (so 8 and about 32 shards), and of the pre-part-8 code at both sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "e604f92"


# ----------------------------------------------------------------------------------------------
# worker: one extraction in this process, results as one JSON line on stdout


def worker(spec: dict) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    import catalog

    out: dict = {"catalog": str(Path(catalog.__file__).parent.parent)}
    kind = spec["kind"]
    if kind == "before":
        from catalog.service import ExtractRequest, default_parameters, extract

        from catalog.store.database import get_engine

        engine = get_engine()
        req = ExtractRequest(model=spec["model"], name=spec["name"], corpus=spec["corpus"],
                             params=default_parameters(**spec["params"]))
        t = time.perf_counter()
        s = extract(req, engine=engine, migrate_schema=False)
        out["wall"] = time.perf_counter() - t
    else:
        from sqlalchemy import text

        from catalog.runs.local import extract, resume
        from catalog.runs.schemas import ExtractRequest, default_parameters
        from catalog.store.database import get_engine

        engine = get_engine()
        if kind == "resume":
            if spec.get("commit_take_over"):
                # Work-around (bench only) for 3f95e8b's resume: take_over's session joins the
                # transaction that pg_try_advisory_lock began on the liveness connection and never
                # commits it, so the run row stays locked and the next FOR UPDATE on another
                # connection of the same process waits forever. Commit it here (the advisory lock
                # is session-level and stays).
                from catalog.runs import lifecycle

                take_over = lifecycle.take_over

                def committed(conn, run_id):  # type: ignore[no-untyped-def]
                    request = take_over(conn, run_id)
                    conn.commit()
                    return request

                lifecycle.take_over = committed
            t = time.perf_counter()
            s = resume(spec["run_id"], engine=engine)
            out["wall"] = time.perf_counter() - t
        else:
            req = ExtractRequest(model=spec["model"], name=spec["name"], corpus=spec["corpus"],
                                 params=default_parameters(**spec["params"]), shard_tokens=spec["shard_tokens"])
            stop_at = spec.get("interrupt_at")

            def hook(stage: str) -> None:
                if stage == stop_at:
                    raise KeyboardInterrupt(stage)

            t = time.perf_counter()
            try:
                s = extract(req, engine=engine, on_stage=hook)
            except KeyboardInterrupt:
                out["wall"] = time.perf_counter() - t
                with engine.connect() as conn:
                    out["run_id"], out["status"] = conn.execute(text(
                        "SELECT id, status FROM extraction_runs ORDER BY id DESC LIMIT 1")).one()
                    out["payloads"] = [list(r) for r in conn.execute(text(
                        "SELECT index, layer, octet_length(payload) FROM shard_states "
                        "WHERE run_id = :r AND kind = 'pass' ORDER BY index, layer"), {"r": out["run_id"]})]
                    out["state_bytes"] = [list(r) for r in conn.execute(text(
                        "SELECT index, tokens, state_bytes FROM run_shards WHERE run_id = :r AND kind = 'pass' "
                        "AND status = 'done' ORDER BY index"), {"r": out["run_id"]})]
                out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print("RESULT " + json.dumps(out), flush=True)
                return
            out["wall"] = time.perf_counter() - t
        out["reused"] = s.reused_shards
        with engine.connect() as conn:
            out["state_bytes"] = [list(r) for r in conn.execute(text(
                "SELECT index, tokens, state_bytes FROM run_shards WHERE run_id = :r AND kind = 'pass' "
                "ORDER BY index"), {"r": s.run_id})]
    out.update(run_id=s.run_id, n_layers=s.n_layers, d_mlp=s.d_mlp, counts={k: v for k, v in s.counts.items()
                                                                            if isinstance(v, int | float)},
               timings=s.timings, maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------
# setup: model, corpus files, databases


def git_head(tree: Path) -> str:
    p = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return p.stdout.strip() + (" + uncommitted changes" if dirty else "")


def build_model(path: Path, corpus: Path, args: argparse.Namespace) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=args.vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
              show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = GPT2Config(vocab_size=len(tok), n_embd=args.d_model, n_inner=args.d_mlp, n_layer=args.layers,
                     n_head=args.d_model // 64, n_positions=512, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)


def doc_lengths(model: Path, corpus: Path, max_tokens: int, params: dict) -> list[int]:
    """Tokens of each document as the planner counts them (shard_tokens=1: one document per shard)."""
    from catalog.corpus import open_corpus
    from catalog.loading import load
    from catalog.runs.schemas import ExtractRequest, default_parameters
    from catalog.runs.sharded import plan_pass

    loaded = load(str(model))
    req = ExtractRequest(model=str(model), corpus=str(corpus), max_tokens=max_tokens,
                         params=default_parameters(**params))
    plan = plan_pass(open_corpus(str(corpus)), loaded, req, 1)
    return [s.tokens for s in plan.shards]


def greedy_shards(lengths: list[int], budget: int) -> int:
    n, fill = 0, 0
    for k in lengths:
        if fill and fill + k > budget:
            n, fill = n + 1, 0
        fill += k
    return n + (1 if fill else 0)


def shard_tokens_for(lengths: list[int], shards: int) -> int:
    lo, hi = max(lengths), sum(lengths)
    while lo < hi:  # smallest budget that plans at most `shards` shards
        mid = (lo + hi) // 2
        if greedy_shards(lengths, mid) <= shards:
            hi = mid
        else:
            lo = mid + 1
    return lo


def write_corpus(src: Path, dst: Path, n_docs: int) -> None:
    from catalog.corpus import open_corpus

    with dst.open("w") as f:
        for i, doc in enumerate(open_corpus(str(src)).documents()):
            if i >= n_docs:
                break
            f.write(doc.text.replace("\n", " ") + "\n")


def create_database(admin_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


# ----------------------------------------------------------------------------------------------
# the synthetic GPT-2-XL-sized shard state


def synthetic_layer_bytes(d_mlp: int, top_n: int, tokens: int, documents: int, seed: int = 0) -> int:
    """One layer's ``layer_payload`` of a state filled as a pass over ``tokens`` tokens would fill it:
    per-neuron coefficient scales (log-normal), the |coefficient| histogram of ``tokens`` normal
    draws per neuron (binned by ``abs_histogram``, as the pass does), moments of those draws, and a
    top-N / bottom-N of distinct documents in strength order."""
    import torch

    from catalog.extract.states import (
        FiringStats,
        PassState,
        RunningStats,
        TopState,
        abs_histogram,
        layer_payload,
    )

    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(d_mlp, generator=g) * 0.5 - 1.0)
    hist = torch.zeros((d_mlp, abs_histogram(torch.zeros(1, 1)).shape[1]), dtype=torch.long)
    gate = torch.zeros(d_mlp, dtype=torch.float64)
    stats = RunningStats.empty(d_mlp, torch.device("cpu"))
    chunk = 2048
    done = 0
    while done < tokens:
        n = min(chunk, tokens - done)
        c = torch.randn((n, d_mlp), generator=g) * scale + 0.1 * scale
        hist += abs_histogram(c)
        gate += (c > 0).sum(0).double()
        stats.update(c.unsqueeze(0), torch.ones((1, n), dtype=torch.bool), c.max(0, keepdim=True).values)
        done += n
    firing = FiringStats(gate, hist, tokens)

    def top() -> TopState:
        v = (torch.randn((d_mlp, top_n), generator=g).abs() * scale.unsqueeze(1) * 2 + 2 * scale.unsqueeze(1))
        v = v.sort(dim=1, descending=True).values  # sign-adjusted: larger is stronger, for both signs
        k = min(top_n, documents)  # a shard of fewer documents than top_n leaves empty slots
        docs = torch.full((d_mlp, top_n), -1, dtype=torch.long)
        docs[:, :k] = torch.stack([torch.randperm(documents, generator=g)[:k] for _ in range(d_mlp)])
        pos = torch.randint(0, 24, (d_mlp, top_n), generator=g)
        prev = torch.randn((d_mlp, top_n), generator=g) * scale.unsqueeze(1)
        v[:, k:], pos[:, k:], prev[:, k:] = -math.inf, 0, math.nan
        return TopState(v, docs, pos, prev)

    state = PassState([stats], [firing], [top()], [top()], torch.zeros(0, dtype=torch.long), {})
    return len(layer_payload(state, 0))


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    ap.add_argument("--tokens", type=int, default=30_000, help="corpus size N (the memory check also runs 4N)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--top-n", type=int, default=50)
    ap.add_argument("--before", type=Path, default=Path("/tmp/nc-before"),
                    help=f"a worktree of {BEFORE_COMMIT} (git worktree add /tmp/nc-before {BEFORE_COMMIT})")
    ap.add_argument("--after", type=Path, default=REPO,
                    help="the tree to measure as 'sharded' (default: this one; e.g. a worktree of a commit)")
    ap.add_argument("--resume-workaround", action="store_true",
                    help="commit take_over's transaction in the resuming worker (see worker())")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each extracting process (1: steadier beside other work on 2 cores)")
    ap.add_argument("--xl-shard-tokens", type=int, default=None, help="default: settings.shard_tokens")
    ap.add_argument("--skip-4n", action="store_true", help="no 4N memory runs")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    args.after = args.after.resolve()
    sys.path.insert(0, str(args.after))  # this process's own imports (plan, migrations) come from it too
    tmp = tempfile.TemporaryDirectory(prefix="nc-bench8-")
    root = Path(tmp.name)
    os.environ["CATALOG_DATA_DIR"] = str(root / "data")
    os.environ.pop("CATALOG_DATABASE_URL", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    import catalog
    from catalog.config import settings
    from catalog.store.database import database_url, stop_embedded
    from catalog.store.migrate import upgrade

    transformers.logging.set_verbosity_error()
    print(f"# part 8 benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPUs  torch {torch.__version__} threads {torch.get_num_threads()}", flush=True)
    if not (args.before / "catalog" / "service.py").is_file():
        sys.exit(f"{args.before}: not a worktree of {BEFORE_COMMIT} "
                 f"(git -C {REPO} worktree add {args.before} {BEFORE_COMMIT})")
    params = {"top_n": args.top_n}
    assert Path(catalog.__file__).parent.parent == args.after, catalog.__file__
    print(f"sharded code: {args.after} ({git_head(args.after)}); pre-part-8 code: {args.before} "
          f"({git_head(args.before)})", flush=True)

    # model and corpus files of N and 4N tokens (whole documents)
    model = root / "model"
    build_model(model, args.corpus, args)
    lengths = doc_lengths(model, args.corpus, 4 * args.tokens, params)
    cum, n_docs = 0, 0
    for n_docs, k in enumerate(lengths, 1):
        cum += k
        if cum >= args.tokens:
            break
    corpus_n, corpus_4n = root / "corpus_n.txt", root / "corpus_4n.txt"
    write_corpus(args.corpus, corpus_n, n_docs)
    write_corpus(args.corpus, corpus_4n, len(lengths))
    len_n = lengths[:n_docs]
    total_n, total_4n = sum(len_n), sum(lengths)
    one = total_4n + 1  # one shard at N
    eight = shard_tokens_for(len_n, 8)
    assert greedy_shards(len_n, eight) == 8, greedy_shards(len_n, eight)
    print(f"torch threads per extracting process: {args.threads}", flush=True)
    print(f"model: random GPT-2, {args.layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}, vocab {args.vocab} "
          f"(byte-level BPE trained on {args.corpus.name}); top_n {args.top_n}", flush=True)
    print(f"corpus N: {total_n} tokens in {n_docs} documents; 4N: {total_4n} tokens in {len(lengths)} documents; "
          f"shard_tokens {eight} -> 8 shards at N, {greedy_shards(lengths, eight)} at 4N", flush=True)

    # databases: one per code version on one embedded server
    admin = database_url()
    url_after = create_database(admin, "bench_after")
    url_before = create_database(admin, "bench_before")
    upgrade(url_after)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    env_before = {**os.environ, "PYTHONPATH": str(args.before), "CATALOG_DATABASE_URL": url_before}
    env_after = {**os.environ, "PYTHONPATH": str(args.after), "CATALOG_DATABASE_URL": url_after}
    env_before.pop("CATALOG_DATA_DIR")
    env_after.pop("CATALOG_DATA_DIR")
    subprocess.run([sys.executable, "-c", "import sys; from catalog.store.migrate import upgrade; upgrade(sys.argv[1])",
                    url_before], env=env_before, check=True, cwd="/")

    def run(spec: dict, before: bool = False) -> dict:
        spec = {"model": str(model), "params": params, "name": "bench", **spec}
        t = time.perf_counter()
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                           env=env_before if before else env_after, cwd="/", capture_output=True, text=True,
                           timeout=900, check=False)
        if p.returncode != 0:
            sys.exit(f"worker {spec} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        res = json.loads(line[len("RESULT "):])
        expect = str(args.before) if before else str(args.after)
        assert res["catalog"] == expect, (res["catalog"], expect)
        res["process"] = time.perf_counter() - t
        label = spec["kind"] + (f" shard_tokens={spec['shard_tokens']}" if "shard_tokens" in spec else "")
        print(f"  {label:<32} {Path(spec.get('corpus', '')).name:<14} wall {res['wall']:6.1f} s  "
              f"peak RSS {res['maxrss_mb']:6.0f} MB", flush=True)
        return res

    # 4N runs first: they also leave a catalog in each database, so every timed run below drops a
    # superseded one, as a re-extraction does.
    big: dict[str, dict] = {}
    if not args.skip_4n:
        print("\n4N corpus (memory):", flush=True)
        big["before"] = run({"kind": "before", "corpus": str(corpus_4n)}, before=True)
        big["eight"] = run({"kind": "sharded", "corpus": str(corpus_4n), "shard_tokens": eight})
    else:
        run({"kind": "before", "corpus": str(corpus_n)}, before=True)
        run({"kind": "sharded", "corpus": str(corpus_n), "shard_tokens": eight})

    print("\nN corpus, timed:", flush=True)
    configs = {
        "before": ({"kind": "before", "corpus": str(corpus_n)}, True),
        "one": ({"kind": "sharded", "corpus": str(corpus_n), "shard_tokens": one}, False),
        "eight": ({"kind": "sharded", "corpus": str(corpus_n), "shard_tokens": eight}, False),
    }
    results: dict[str, list[dict]] = {k: [] for k in configs}
    for rep in range(args.reps):
        order = ["before", "one", "eight"] if rep % 2 == 0 else ["eight", "one", "before"]
        for key in order:
            spec, before = configs[key]
            results[key].append(run(spec, before))
    assert all(r["counts"].get("shards") == 8 for r in results["eight"]), results["eight"][0]["counts"]
    assert all(r["counts"].get("shards") == 1 for r in results["one"])
    med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}

    print("\ninterrupted at 'pass shard 4', then resumed:", flush=True)
    cut = run({"kind": "sharded", "corpus": str(corpus_n), "shard_tokens": eight, "interrupt_at": "pass shard 4"})
    assert cut["status"] == "interrupted", cut["status"]
    resumed = run({"kind": "resume", "run_id": cut["run_id"], "commit_take_over": args.resume_workaround})

    # state sizes
    n_layers = args.layers
    sb = results["eight"][-1]["state_bytes"]
    per_layer_run = statistics.mean(b / n_layers for _, _, b in sb)
    shard_tok = statistics.mean(t for _, t, _ in sb)
    layer_payloads = [b for _, layer, b in cut["payloads"] if layer >= 0]
    head_payloads = [b for _, layer, b in cut["payloads"] if layer < 0]
    docs_per_shard = max(1, n_docs // 8)
    print("\nsynthetic states ...", flush=True)
    t = time.perf_counter()
    synth_small = synthetic_layer_bytes(args.d_mlp, args.top_n, int(shard_tok), docs_per_shard)
    xl_tokens = args.xl_shard_tokens or settings.shard_tokens
    xl_docs = max(1, round(xl_tokens * n_docs / total_n))
    synth_xl = synthetic_layer_bytes(6400, 50, xl_tokens, xl_docs)
    synth_xl_small = synthetic_layer_bytes(6400, 50, int(shard_tok), docs_per_shard)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    scaled_xl = statistics.mean(layer_payloads) * 6400 / args.d_mlp * 50 / args.top_n

    # table
    def ms(key: str) -> str:
        v = [r["wall"] for r in results[key]]
        return f"{med[key]:.1f} ({', '.join(f'{x:.1f}' for x in v)})"

    rss = {k: max(r["maxrss_mb"] for r in v) for k, v in results.items()}
    print("\n| figure | value |")
    print("|---|---|")
    print(f"| corpus | {total_n} tokens, {n_docs} documents (4N: {total_4n} tokens, {len(lengths)} documents) |")
    print(f"| pre-part-8 in-process run ({BEFORE_COMMIT}), median (each) s | {ms('before')} |")
    print(f"| sharded, 1 shard (shard_tokens {one}), median (each) s | {ms('one')} |")
    print(f"| sharded, 8 shards (shard_tokens {eight}), median (each) s | {ms('eight')} |")
    print(f"| **ratio 1 shard / pre-part-8** | **{med['one'] / med['before']:.3f}** |")
    print(f"| **ratio 8 shards / pre-part-8** (target <= 1.05) | **{med['eight'] / med['before']:.3f}** |")
    p8 = statistics.median(r["timings"].get("corpus_pass", float("nan")) for r in results["eight"])
    p1 = statistics.median(r["timings"].get("corpus_pass", float("nan")) for r in results["one"])
    pb = statistics.median(r["timings"].get("corpus_pass", float("nan")) for r in results["before"])
    print(f"| corpus pass alone, median s: pre-part-8 / 1 shard / 8 shards | {pb:.1f} / {p1:.1f} / {p8:.1f} |")
    print(f"| run interrupted at 'pass shard 4' (4 of 8 pass shards done), s to the interrupt | {cut['wall']:.1f} |")
    print(f"| resume in a new process, s (reused shards) | {resumed['wall']:.1f} ({resumed['reused']}) |")
    print(f"| **resume / full 8-shard run** | **{resumed['wall'] / med['eight']:.2f}** "
          f"(saves {med['eight'] - resumed['wall']:.1f} s) |")
    print(f"| interrupted + resumed / full 8-shard run | {(cut['wall'] + resumed['wall']) / med['eight']:.2f} |")
    print(f"| pass shard state, run_shards.state_bytes / {n_layers} layers (8-shard run, ~{shard_tok:.0f} tokens "
          f"per shard) | {per_layer_run:,.0f} B |")
    print(f"| stored layer_payload per layer, d_mlp {args.d_mlp}, top_n {args.top_n} (min-max) | "
          f"{statistics.mean(layer_payloads):,.0f} B ({min(layer_payloads):,}-{max(layer_payloads):,}); "
          f"shard-wide payload {statistics.mean(head_payloads):,.0f} B |")
    print(f"| synthetic state, same d_mlp and tokens per shard (check of the generator) | {synth_small:,} B |")
    print(f"| GPT-2-XL size (d_mlp 6400, top_n 50), real payload scaled by d_mlp | {scaled_xl / 1e6:.2f} MB |")
    print(f"| GPT-2-XL size, synthetic, {int(shard_tok)} tokens per shard | {synth_xl_small / 1e6:.2f} MB |")
    print(f"| GPT-2-XL size, synthetic, {xl_tokens} tokens per shard (default shard_tokens) | {synth_xl / 1e6:.2f} MB "
          f"per layer, {48 * synth_xl / 1e6:.0f} MB per shard (48 layers) |")
    if big:
        print(f"| peak RSS, pre-part-8: N / 4N | {rss['before']:.0f} / {big['before']['maxrss_mb']:.0f} MB |")
        print(f"| peak RSS, sharded (shard_tokens {eight}): N, 8 shards / 4N, {greedy_shards(lengths, eight)} shards | "
              f"{rss['eight']:.0f} / {big['eight']['maxrss_mb']:.0f} MB |")
    print(f"| peak RSS, sharded, 1 shard at N | {rss['one']:.0f} MB |")
    print("\nstage timings of the last run of each (s):")
    for k, v in results.items():
        print(f"  {k}: " + ", ".join(f"{a} {b:.1f}" for a, b in v[-1]["timings"].items() if isinstance(b, int | float)))
    print("  resume: " + ", ".join(f"{a} {b:.1f}" for a, b in resumed["timings"].items()))
    stop_embedded()
    tmp.cleanup()


if __name__ == "__main__":
    main()
