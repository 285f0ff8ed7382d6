"""Part 3 benchmark: the search API on a GPT-2-XL-sized synthetic catalog, through HTTP.

    .venv/bin/python bench/part3_search.py [--data-dir DIR] [--duration 60] [--clients 8] [--workers 2]

1. Build (once; reused while the catalog exists in DIR): 48 layers x 6,400 neurons = 307,200 neurons
   with 1,600-dim key and value vectors, 50 triggers and 30 top tokens each, trigger prefixes cut
   from the WordNet demo corpus, tokens from the SmolLM2 vocabulary, written by the normal ingest
   path (``RunWriter``: binary COPY, neuron_search, exact lists since part 10) and published like an extraction. Vectors
   are structured, not white noise: a shared 128-dim subspace plus noise and log-normal norms
   (unstructured 1,600-dim Gaussians are the worst case for any ANN index and unlike real
   weights). Reports the time of each stage and index, and the database size.
   Also extracts SmolLM2 weights-only into the same database, for the probe.
2. Serve: ``neuron-catalog serve --workers N`` as a subprocess; start time and RSS.
3. Load: ``--clients`` concurrent clients per request kind (p50 / p99 ms), then a mixed load for
   ``--duration`` s (requests/s, errors). Token-ranking recall@50 against an exact numpy
   computation over the same vectors; probe latency for a 64-token text on SmolLM2 (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NAME = "synthetic-gpt2-xl"
# BENCH3_SCALE < 1 shrinks layers and neurons for a quick trial of the script itself.
_SCALE = float(os.environ.get("BENCH3_SCALE", "1"))
N_LAYERS, D_MLP, D_MODEL, TOP_N, VALUE_TOP, RANK = max(2, int(48 * _SCALE)), max(64, int(6400 * _SCALE)), 1600, 50, 30, 128
N_PREFIXES = max(5000, int(500_000 * _SCALE))
SEED = 1234


def basis() -> Any:
    import torch

    g = torch.Generator().manual_seed(SEED)
    return torch.randn(RANK, D_MODEL, generator=g) / RANK**0.5


def structured(n: int, seed: int, u: Any) -> Any:
    """[n, D_MODEL] float32: a shared low-rank part, isotropic noise, log-normal row norms."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, RANK, generator=g) @ u + 0.35 * torch.randn(n, D_MODEL, generator=g) / D_MODEL**0.5
    return (x * torch.exp(0.3 * torch.randn(n, 1, generator=g))).float()


def layer_vectors(layer: int, u: Any) -> tuple[Any, Any]:
    return structured(D_MLP, 10_000 + 2 * layer, u), structured(D_MLP, 10_001 + 2 * layer, u)


def unembedding(vocab: int, u: Any) -> Any:
    return structured(vocab, 7, u)


def list_sample(vocab: int, vocab_texts: list[str]) -> tuple[list[int], list[int]]:
    """``--lists sampled``: the token ids and flat neuron ids whose lists are built: 200 of each at
    random, with the ones the benchmarks ask for by name (id:1000, Paris, neuron 20/7)."""
    import numpy as np

    rng = np.random.default_rng(SEED + 1)
    named = [1000, *(i for i, t in enumerate(vocab_texts) if t in ("Paris", " Paris"))]
    tokens = sorted({*named, *rng.choice(vocab, 200, replace=False).tolist()})
    neurons = sorted({min(20, N_LAYERS - 1) * D_MLP + 7, *rng.choice(N_LAYERS * D_MLP, 200, replace=False).tolist()})
    return [int(t) for t in tokens], [int(f) for f in neurons]


def build(vocab_texts: list[str], corpus_lines: list[str], sampled: bool) -> dict[str, float]:
    import numpy as np
    import torch
    from sqlalchemy import text, update

    from catalog.extract.baselines import Baselines
    from catalog.extract.columns import layer_columns
    from catalog.extract.neighbours import TokenLists, similar_lists
    from catalog.extract.pipeline import LayerRecord
    from catalog.extract.states import TopState
    from catalog.extract.weights import NeuronWeights, TokenProjection
    from catalog.store import migrate
    from catalog.store.database import get_engine, session_scope
    from catalog.store.ingest import RunWriter
    from catalog.store.models import CatalogModel, ExtractionRun, RunStatus

    engine = get_engine()
    migrate.upgrade(None)
    rng = np.random.default_rng(SEED)
    times: dict[str, float] = {}
    u = basis()
    vocab = len(vocab_texts)
    with session_scope(engine) as s:
        entry = CatalogModel(name=NAME, source="synthetic", family="gpt2", model_type="gpt2", n_layers=N_LAYERS,
                             d_model=D_MODEL, d_mlp=D_MLP, vocab_size=vocab, gated=False)
        s.add(entry)
        s.flush()
        run = ExtractionRun(model_id=entry.id, status=RunStatus.running,
                            parameters={"top_n": TOP_N, "value_top": VALUE_TOP, "window": 256, "synthetic": True},
                            projection_convention="raw_unembedding", progress={})
        s.add(run)
        s.flush()
        run_id, model_id = run.id, entry.id
    sample_tokens, sample_neurons = list_sample(vocab, vocab_texts) if sampled else (None, None)
    # Prefixes: one per synthetic document, cut from WordNet lines at a random word.
    docs = np.arange(N_PREFIXES)
    texts = []
    for i in range(N_PREFIXES):
        words = corpus_lines[int(rng.integers(len(corpus_lines)))].split()
        texts.append(" ".join(words[: int(rng.integers(1, len(words) + 1))]))
    positions = torch.tensor([len(t.split()) - 1 for t in texts])
    token = rng.integers(0, vocab, N_PREFIXES)
    nxt = np.where(rng.random(N_PREFIXES) < 0.05, -1, rng.integers(0, vocab, N_PREFIXES))
    prefixes = {  # RunWriter.prefixes' named columns
        "document": docs.tolist(), "position": positions.tolist(), "text": texts, "token_id": token.tolist(),
        "next_token_id": [int(x) if x >= 0 else None for x in nxt],
    }
    with engine.connect() as conn, conn.begin():
        writer = RunWriter(conn.connection.driver_connection, run_id)
        t0 = time.perf_counter()
        writer.tokens(vocab_texts, unembedding(vocab, u).numpy())
        times["tokens"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.prefixes(prefixes)
        times["prefixes"] = time.perf_counter() - t0
        gen = 0.0
        # Part 10: exact lists instead of HNSW indexes. At full scale these are ~25 TMAC (token lists)
        # and 2 x 150 TMAC (similar lists): minutes on a GPU, hours on this 2-core CPU.
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        E_t = unembedding(vocab, u).to(dev)
        if sample_tokens is not None:  # lists of the sampled tokens only, each still over every neuron
            E_t = E_t[torch.tensor(sample_tokens, device=dev)]
        ranked = TokenLists(E_t, None, D_MLP)
        all_keys, all_values = [], []
        for layer in range(N_LAYERS):
            g0 = time.perf_counter()
            keys, values = layer_vectors(layer, u)
            kn, vn = keys.norm(dim=1).double(), values.norm(dim=1).double()
            align = torch.nn.functional.cosine_similarity(keys.double(), values.double(), dim=1)
            bias = torch.from_numpy(rng.normal(-0.1, 0.05, D_MLP))
            top_ids = torch.from_numpy(rng.choice(vocab, size=(D_MLP, VALUE_TOP + 10)))
            logits = torch.from_numpy(np.sort(rng.normal(0, 1, (D_MLP, VALUE_TOP + 10)), axis=1)[:, ::-1].copy())
            proj = TokenProjection(top_ids[:, :VALUE_TOP], logits[:, :VALUE_TOP].float(),
                                   top_ids[:, VALUE_TOP:], logits[:, VALUE_TOP:].flip(1).float())
            trig = torch.from_numpy(np.stack([rng.choice(N_PREFIXES, TOP_N, replace=False) for _ in range(D_MLP)]))
            coeffs = torch.from_numpy(np.sort(rng.gamma(2.0, 1.0, (D_MLP, TOP_N)), axis=1)[:, ::-1].copy()).float()
            top = TopState(coeffs, trig, positions[trig], coeffs * 0.3)
            ablated = {k: coeffs * float(f) for k, f in (("last", 0.2), ("first", 0.9), ("random", 0.8))}
            act = {"mean": torch.from_numpy(rng.normal(0, 0.1, D_MLP)), "std": torch.from_numpy(rng.gamma(2, 0.2, D_MLP)),
                   "positive_fraction": torch.from_numpy(rng.beta(2, 5, D_MLP)), "max": coeffs[:, 0].double()}
            labels = [str(x) for x in rng.choice(["shallow", "semantic", "shallow+semantic"], D_MLP, p=[0.6, 0.1, 0.3])]
            stats = {"mean_bias": float(bias.mean()), "mean_alignment": float(align.mean()), "key_cosine_mean": 0.0,
                     "value_cosine_mean": 0.0, "histograms": {}}
            rec = LayerRecord(
                layer=layer, stats=stats,
                weights=NeuronWeights(kn, vn, align, bias, None, None), keys=keys, values=values, ups=None,
                projection=proj, activation=act,
                agreement=Baselines(torch.from_numpy(rng.beta(1, 60, D_MLP)), torch.from_numpy(rng.normal(vocab / 2, 3000, D_MLP))),
                ablation={k: torch.from_numpy(rng.normal(m, 0.2, D_MLP)) for k, m in (("last", -0.8), ("first", -0.1), ("random", -0.2))},
                labels=labels, top=top, bottom=None, top_ablated=ablated,
            )
            gen += time.perf_counter() - g0
            writer.layer(**layer_columns(rec))
            l0 = time.perf_counter()
            ranked.add(layer, values.to(dev), values.to(dev) @ E_t.T, None)
            times["token_lists"] = times.get("token_lists", 0.0) + time.perf_counter() - l0
            all_keys.append(keys)
            all_values.append(values)
            print(f"  layer {layer}: ingest {writer.seconds:.0f}s, search terms {writer.search_seconds:.0f}s, "
                  f"generate {gen:.0f}s", flush=True)
        times["generate"] = gen
        times["ingest_rows"] = writer.seconds - times["tokens"] - times["prefixes"]
        times["search_terms"] = writer.search_seconds
        l0 = time.perf_counter()
        for (convention, ranking), lists in ranked.finish().items():
            writer.token_lists(convention, ranking, lists.ids, lists.scores, lists.length, rows=sample_tokens)
        times["token_lists"] += time.perf_counter() - l0
        for space, parts in (("key", all_keys), ("value", all_values)):
            l0 = time.perf_counter()
            rows = None if sample_neurons is None else np.array(sample_neurons)
            sim = similar_lists(torch.cat(parts).to(dev), rows=rows)
            writer.similar_lists(space, D_MLP, sim.ids, sim.scores, sim.length, rows=sample_neurons)
            times[f"similar_{space}"] = time.perf_counter() - l0
        print(f"  lists {times}", flush=True)
        params = {"top_n": TOP_N, "value_top": VALUE_TOP, "window": 256, "synthetic": True,
                  "lists": "sampled" if sampled else "all"}
        if sampled:
            params["list_sample"] = {"tokens": sample_tokens, "neurons": sample_neurons}
        conn.execute(update(ExtractionRun).where(ExtractionRun.id == run_id).values(
            status=RunStatus.complete, timings=times, finished_at=datetime.now(UTC), parameters=params))
        conn.execute(update(CatalogModel).where(CatalogModel.id == model_id).values(current_run_id=run_id))
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    from catalog.runs.local import tidy

    tidy(engine)  # what a published run gets: the triggers' pages all-visible (index-only scans)
    return times


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("/var/tmp/neuron-catalog-bench3"))
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-kind", type=int, default=200, help="requests per kind")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--layers", type=int, default=48, help="48 = GPT-2-XL; fewer for a quicker trial (own name)")
    ap.add_argument("--load", choices=("wrk", "python"), default="wrk", help=(
        "load generator: wrk (a C program in its own process, Debian's package, installed when missing) or "
        "Python threads in this process (what the first figures used; the client then shares the GIL)"))
    ap.add_argument("--seconds", type=float, default=10.0, help="wrk: seconds per request kind")
    ap.add_argument("--lists", choices=("all", "sampled"), default="all", help=(
        "exact lists of every token and neuron (hours on a 2-core CPU: 2 x 150 TMAC of Gram products), or "
        "of 200 sampled tokens and neurons, each over every neuron (the requests then ask for those)"))
    args = ap.parse_args()
    global N_LAYERS, NAME
    N_LAYERS = args.layers
    if args.layers != 48:
        NAME = f"{NAME}-{args.layers}-layers"
    args.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["CATALOG_DATA_DIR"] = str(args.data_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"# part 3 benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs")

    from sqlalchemy import text

    from catalog.read.catalog import current_run
    from catalog.store import migrate
    from catalog.store.database import database_url, get_engine, session_scope

    migrate.upgrade(None)
    with session_scope() as s:
        have = current_run(s, NAME)
        smol = current_run(s, "SmolLM2-135M-Instruct")
    if smol is None:
        print("extracting SmolLM2 (weights only) for the probe ...", flush=True)
        from catalog.runs.local import extract
        from catalog.runs.schemas import ExtractRequest

        extract(ExtractRequest(model="smollm2", name="SmolLM2-135M-Instruct"))
    if have is None:
        from catalog.loading import load

        tok = load("smollm2").tokenizer
        vocab_texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
        lines = [ln for ln in (REPO / "data" / "wordnet.txt").read_text().splitlines() if ln.strip()]
        t0 = time.perf_counter()
        times = build(vocab_texts, lines, args.lists == "sampled")
        times["total"] = time.perf_counter() - t0
        print("build:", json.dumps({k: round(v, 1) for k, v in times.items()}))
    else:
        print("build: reused;", json.dumps({k: round(v, 1) for k, v in (have[1].timings or {}).items()}))
    with get_engine().connect() as conn:
        size = conn.scalar(text("SELECT pg_database_size(current_database())"))
        idx = conn.execute(text(
            "SELECT relname, pg_relation_size(oid) FROM pg_class WHERE relname LIKE 'ix_neurons_hnsw_%' "
            "OR relname LIKE 'ix_neuron_search_%' ORDER BY 2 DESC LIMIT 8")).all()
    print(f"database size: {size / 2**30:.2f} GiB; largest search indexes: "
          + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in idx))
    if args.build_only:
        return

    t0 = time.perf_counter()
    server, base = start_server(database_url(), args.port, args.workers)
    try:
        start_s = time.perf_counter() - t0
        rss = sum(_rss_mb(p) for p in [server.pid, *_children(server.pid)])
        print(f"serve: healthy after {start_s:.2f} s, RSS {rss:.0f} MB ({args.workers} workers + parent)")
        run_load(base, args, vocab_size=_vocab(), lines=[ln for ln in (REPO / "data" / "wordnet.txt").read_text().splitlines()[:20000] if ln])
    finally:
        server.terminate()
        server.wait(30)


def start_server(url: str, port: int, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    """``neuron-catalog serve`` as a subprocess on ``url``; returns it and its base URL once healthy."""

    # the load comes from one address: part 6's per-client limit would answer most of it with 429
    env = {**os.environ, "CATALOG_DATABASE_URL": url, "CATALOG_RATE_LIMIT_PER_S": "0"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("neuron-catalog")), "serve", "--port", str(port),
                               "--workers", str(workers)], env=env)
    return server, wait_healthy(server, f"http://127.0.0.1:{port}")


def wait_healthy(server: subprocess.Popen[bytes], base: str, timeout_s: float = 120.0) -> str:
    """``base`` once the server answers /healthz (SystemExit if it dies or takes over ``timeout_s``)."""
    import httpx

    t0 = time.perf_counter()
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > timeout_s or server.poll() is not None:
            server.terminate()
            raise SystemExit("server did not start")
        time.sleep(0.1)


def _vocab() -> int:
    from catalog.read.catalog import current_run
    from catalog.store.database import session_scope

    with session_scope() as s:
        found = current_run(s, NAME)
        assert found is not None
        return found[0].vocab_size


def list_sample_of_run() -> dict[str, list[int]] | None:
    """The tokens and neurons that have lists, when the catalog was built with ``--lists sampled``."""
    from catalog.read.catalog import current_run
    from catalog.store.database import session_scope

    with session_scope() as s:
        found = current_run(s, NAME)
        assert found is not None
        return (found[1].parameters or {}).get("list_sample")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_load(base: str, args: argparse.Namespace, *, vocab_size: int, lines: list[str]) -> None:
    import httpx
    import numpy as np

    rnd = random.Random(7)
    api = f"{base}/api/v1/models/{NAME}"
    sample = list_sample_of_run()  # --lists sampled: ask only for what has a list
    tokens = sample["tokens"] if sample else range(vocab_size)
    neurons = [divmod(f, D_MLP) for f in sample["neurons"]] if sample else [
        (layer, n) for layer in range(N_LAYERS) for n in range(D_MLP)]
    stats = ["key_norm", "value_norm", "alignment", "activation_max", "agreement", "ablation_last"]

    # A deep cursor: 20,000 neurons into a sorted search (cursors do not depend on the page size).
    def deep_cursor() -> str:
        with httpx.Client(timeout=60) as c:
            url, cur = f"{api}/neurons?sort=-alignment&limit=500", None
            for _ in range(40):
                r = c.get(url + (f"&cursor={cur}" if cur else "")).json()
                cur = r["next_cursor"]
            return cur

    deep = deep_cursor()
    kinds: dict[str, Any] = {
        # the floor: a request that touches no table, served under the same load
        "healthz (floor)": lambda: f"{base}/healthz",
        "neuron detail": lambda: f"{api}/neurons/{rnd.randrange(N_LAYERS)}/{rnd.randrange(D_MLP)}",
        "filter+sort": lambda: (f"{api}/neurons?layer_min={(lo := rnd.randrange(max(1, N_LAYERS - 8)))}"
                                f"&layer_max={min(N_LAYERS - 1, lo + 8)}"
                                f"&min_{rnd.choice(stats)}={rnd.uniform(-0.5, 0.5):.3f}&sort=-{rnd.choice(stats)}&limit=50"),
        "deep keyset page": lambda: f"{api}/neurons?sort=-alignment&limit=50&cursor={deep}",
        "pattern (rare word)": lambda: f"{api}/neurons?q={rnd.choice(['xylophone', 'zeppelin', 'quinine', 'sextant', 'walrus'])}",
        "pattern (common word)": lambda: f"{api}/neurons?q={rnd.choice(['the', 'of', 'a', 'or', 'to'])}",
        "pattern (phrase)": lambda: f"{api}/neurons?q=\"{rnd.choice(['of the', 'a person', 'in the', 'the act', 'used to'])}\"",
        "token search": lambda: f"{api}/neurons?token=id:{rnd.randrange(vocab_size)}",
        "token ranking": lambda: f"{api}/tokens/id:{rnd.choice(tokens)}/neurons?k=50",
        "similar neurons": lambda: ("{}/neurons/{}/{}/similar".format(api, *rnd.choice(neurons))
                                    + f"?space={rnd.choice(['key', 'value'])}&k=20"),
    }
    results: dict[str, dict[str, float]] = {}
    floor_urls = [f"{base}/healthz"] * 10
    for kind, make in kinds.items():
        urls = [make() for _ in range(args.per_kind)]
        if args.load == "wrk":
            # warm-up on other requests of the same kind (the index pages, not these very rows),
            # as a server that has been up for a while has them; then the floor right before the
            # kind: this VM's speed drifts by 4x within a minute, so each kind is held against its own
            wrk(base, [make() for _ in range(args.per_kind)], args.clients, 3)
            floor = wrk(base, floor_urls, args.clients, 3)
            results[kind] = wrk(base, urls, args.clients, args.seconds)
            errors = int(results[kind]["errors"])
        else:
            lat, errors = hammer(urls, args.clients)
            results[kind] = {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "errors": errors, "n": len(lat)}
            floor = results["healthz (floor)"]
        r = results[kind]
        print(f"{kind:>22}: p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  floor p50/p99 {floor['p50']:5.1f}/{floor['p99']:6.1f} ms"
              f"  ratio p50 {r['p50'] / floor['p50']:5.1f}x p99 {r['p99'] / floor['p99']:5.1f}x  "
              f"errors {errors}/{int(r['n'])}", flush=True)

    # Mixed load for --duration seconds.
    if args.load == "wrk":
        mixed = [make() for make in (m for kind, m in kinds.items() if kind != "healthz (floor)") for _ in range(200)]
        random.Random(5).shuffle(mixed)
        r = wrk(base, mixed, args.clients, args.duration)
        print(f"mixed load (wrk, {args.clients} connections): {r['rps']:.1f} requests/s over {args.duration:.0f} s, "
              f"{int(r['errors'])} errors of {int(r['n'])}; p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms", flush=True)
    stop = time.perf_counter() + (0 if args.load == "wrk" else args.duration)
    counts, errs, lock = [0], [0], threading.Lock()
    makers = [make for kind, make in kinds.items() if kind != "healthz (floor)"]

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while time.perf_counter() < stop:
                r = c.get(rnd.choice(makers)())
                with lock:
                    counts[0] += 1
                    errs[0] += r.status_code != 200

    if args.load == "python":
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        el = time.perf_counter() - t0
        print(f"mixed load: {counts[0] / el:.1f} requests/s over {el:.0f} s, {errs[0]} errors of {counts[0]}")

    # Recall@50 of token ranking against numpy over the very vectors that were ingested.
    u = basis()
    pairs = [layer_vectors(layer, u) for layer in range(N_LAYERS)]
    space_vectors = {"key": np.concatenate([k.numpy() for k, _ in pairs]),
                     "value": np.concatenate([v.numpy() for _, v in pairs])}
    del pairs
    values = space_vectors["value"]
    E = unembedding(vocab_size, u).numpy()
    recalls, in_order = [], 0
    values64 = values.astype(np.float64)
    with httpx.Client(timeout=60) as c:
        for tid in random.Random(3).sample(list(tokens), 50):
            got = [(x["layer"], x["neuron"]) for x in c.get(f"{api}/tokens/id:{tid}/neurons?k=50").json()["items"]]
            logits = values64 @ E[tid].astype(np.float64)
            exact = np.lexsort((np.arange(len(logits)), -logits))[:50]  # float64, ties by flat id
            want = [(int(i) // D_MLP, int(i) % D_MLP) for i in exact]
            recalls.append(len(set(got) & set(want)) / 50)
            in_order += got == want
    del values64
    print(f"token ranking: {in_order} of 50 tokens equal to numpy's exact order")
    print(f"token ranking recall@50 vs exact (50 tokens): mean {statistics.mean(recalls):.3f}, min {min(recalls):.2f}")
    # Similar neurons, both spaces: the API's first 20, in order, against numpy's float64 cosine order
    # (ties by flat id) over the same float32 vectors.
    same, asked = 0, 0
    with httpx.Client(timeout=60) as c:
        for space, V in space_vectors.items():
            unit = V.astype(np.float64)
            unit /= np.linalg.norm(unit, axis=1, keepdims=True)
            for layer, neuron in random.Random(4).sample(neurons, 25):
                i = layer * D_MLP + neuron
                got = [(x["layer"], x["neuron"]) for x in c.get(
                    f"{api}/neurons/{layer}/{neuron}/similar?space={space}&k=20").json()["items"]]
                cos = unit @ unit[i]
                cos[i] = -np.inf
                exact = np.lexsort((np.arange(len(cos)), -cos))[:20]
                same += got == [(int(j) // D_MLP, int(j) % D_MLP) for j in exact]
                asked += 1
    print(f"similar neurons (k 20, key and value): {same} of {asked} equal to numpy's exact order")

    # Probe on SmolLM2 (warm): a 64-token text.
    text64 = " ".join(lines[:40])
    with httpx.Client(timeout=300) as c:
        import transformers

        from catalog.loading import load

        transformers.logging.set_verbosity_error()
        tok = load("smollm2").tokenizer
        ids = tok(text64, add_special_tokens=False)["input_ids"][:64]
        body = {"text": tok.decode(ids), "k": 10}
        t0 = time.perf_counter()
        r = c.post(f"{base}/api/v1/models/SmolLM2-135M-Instruct/probe", json=body)
        first = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        lat = []
        for _ in range(20):
            t0 = time.perf_counter()
            c.post(f"{base}/api/v1/models/SmolLM2-135M-Instruct/probe", json=body)
            lat.append((time.perf_counter() - t0) * 1000)
    print(f"probe (SmolLM2, {len(r.json()['tokens'])} tokens): first {first:.1f} s (loads the model), "
          f"warm p50 {percentile(lat, 50):.0f} ms p99 {percentile(lat, 99):.0f} ms")


WRK_SCRIPT = """
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKJSON {\\"p50\\": %%f, \\"p99\\": %%f, \\"n\\": %%d, \\"errors\\": %%d, \\"us\\": %%d}\\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.requests,
    e.status + e.connect + e.read + e.write + e.timeout, summary.duration))
end
"""


def wrk(base: str, urls: list[str], connections: int, seconds: float) -> dict[str, float]:
    """Closed-loop load from wrk (one thread, ``connections`` connections) over the URLs in turn."""
    import shutil
    import tempfile

    import httpx

    if shutil.which("wrk") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"], check=True,
                       capture_output=True)
    paths = ", ".join(json.dumps(httpx.URL(u).raw_path.decode()) for u in urls)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % paths)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "30s", "-s", f.name, base],
                         check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    r = json.loads(line[len("WRKJSON "):])
    r["rps"] = r["n"] / (r["us"] / 1e6)
    return r


def hammer(urls: list[str], clients: int) -> tuple[list[float], int]:
    import httpx

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    it = iter(urls)

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while True:
                with lock:
                    url = next(it, None)
                if url is None:
                    return
                t0 = time.perf_counter()
                r = c.get(url)
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    lat.append(ms)
                    errors[0] += r.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors[0]


if __name__ == "__main__":
    main()
