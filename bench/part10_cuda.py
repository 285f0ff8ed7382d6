"""Part 10: the CUDA path held against the CPU path, and a SmolLM2-shaped model for GPU timings.

    PYTHONPATH=. python bench/part10_cuda.py check [--families gpt2,gpt_neox,opt,llama] [--max-tokens 3000]
    PYTHONPATH=. python bench/part10_cuda.py pass --model SPEC [--max-tokens 4000] [--runs cuda:float32,cuda:bfloat16]
    PYTHONPATH=. python bench/part10_cuda.py shaped --like DIR --out DIR [--seed 0]

``check`` extracts each tiny seeded family (tests/tiny_models.py) twice into one embedded Postgres,
``--device cpu`` (the compiled fold, the reference) and ``--device cuda`` (the torch operations), then
compares what was published: every neuron record (statistics, triggers, predictions; floats to a
relative 1e-4, everything else exactly), the similar-neuron lists and the token ranking lists (ids
exactly over the head both lists keep, scores to 1e-4). It prints the mismatches per field and exits 1
if any. ``--against cpu`` compares CPU with CPU (the comparison itself, on a machine without CUDA).

``pass`` runs one model's corpus pass on CPU in float32 (the reference) and then as ``--runs`` says,
and prints how far each lands from the reference: triggers kept, values, moments, counts.

``shaped`` writes a model directory with ``--like``'s config and tokenizer and seeded random weights:
the same shapes and so the same arithmetic as the packaged SmolLM2, for timing on a machine the
98 MB GGUF cannot travel to (the device tool carries 64 MiB). Timings only: its catalog means nothing.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
REL = 1e-4


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= REL * max(1.0, abs(a), abs(b))


def compare(a: Any, b: Any, path: str, bad: Counter[str], seen: Counter[str]) -> None:
    """Count, per field path, the values that differ (floats beyond REL, anything else at all)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            compare(a.get(k), b.get(k), f"{path}.{k}", bad, seen)
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            seen[path] += 1
            bad[path + "[len]"] += 1
        for x, y in zip(a, b, strict=False):
            compare(x, y, path + "[]", bad, seen)
        return
    seen[path] += 1
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        if not _close(float(a), float(b)):
            bad[path] += 1
    elif a != b:
        bad[path] += 1


def _lists(session: Any, run_id: int) -> dict[tuple[Any, ...], tuple[list[int], list[float]]]:
    from sqlalchemy import select

    from catalog.store.models import SimilarList, TokenList

    out: dict[tuple[Any, ...], tuple[list[int], list[float]]] = {}
    for s in session.scalars(select(SimilarList).where(SimilarList.run_id == run_id)):
        out[("similar", s.space, s.layer, s.neuron)] = (list(s.ids), list(s.cosines))
    for t in session.scalars(select(TokenList).where(TokenList.run_id == run_id)):
        out[("tokens", t.convention, t.ranking, t.token_id)] = (list(t.ids), list(t.scores))
    return out


def check(families: list[str], max_tokens: int, against: str) -> int:
    import tiny_models
    import torch

    from catalog.read.catalog import records, require_run
    from catalog.runs.local import extract
    from catalog.runs.schemas import ExtractRequest
    from catalog.store import migrate
    from catalog.store.database import get_engine, session_scope, stop_embedded

    if against == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (use --against cpu to check the comparison itself)")
        return 2
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if against == 'cuda' else 'cpu'}; "
          f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}", flush=True)
    engine = get_engine()
    migrate.upgrade()
    failures = 0
    root = Path(tempfile.mkdtemp(prefix="nc-cuda-check-"))
    try:
        for family in families:
            model = tiny_models.save(family, root / family)
            corpus = root / "corpus.txt"  # seeded sentences of the tiny vocabulary (a word-level tokenizer)
            rng = random.Random(0)
            corpus.write_text("\n".join(" ".join(rng.choices(tiny_models.WORDS, k=rng.randint(5, 40)))
                                        for _ in range(max_tokens // 10)) + "\n")
            names = {}
            for device in ("cpu", against):
                name = f"cuda-check-{family}-{device}-{len(names)}"
                summary = extract(ExtractRequest(model=str(model), name=name, corpus=str(corpus), max_tokens=max_tokens,
                                                device=device),
                                  engine=engine)
                names[device if device not in names else device + "2"] = name
                print(f"  {family} on {device}: {summary.counts.get('corpus_tokens', summary.counts.get('tokens', '?'))} tokens, stages "
                      + ", ".join(f"{k} {v:.2f}" for k, v in summary.timings.items() if k != "total"), flush=True)
            ref_name, got_name = names.values()
            bad: Counter[str] = Counter()
            seen: Counter[str] = Counter()
            with session_scope(engine) as s:
                ref = list(records(s, ref_name))
                got = list(records(s, got_name))
                for r, g in zip(ref, got, strict=True):
                    for volatile in ("catalog", "model", "run_id", "run"):
                        r.pop(volatile, None)
                        g.pop(volatile, None)
                    compare(r, g, "neuron", bad, seen)
                ref_lists = _lists(s, require_run(s, ref_name)[1].id)
                got_lists = _lists(s, require_run(s, got_name)[1].id)
            list_bad = Counter[str]()
            heads = 0
            for key, (ids, scores) in ref_lists.items():
                if key not in got_lists:
                    list_bad[f"{key[0]} missing"] += 1
                    continue
                gids, gscores = got_lists[key]
                n = min(len(ids), len(gids))
                heads += n
                if ids[:n] != gids[:n]:
                    list_bad[f"{key[0]} ids"] += 1
                if not all(_close(x, y) for x, y in zip(scores[:n], gscores[:n], strict=True)):
                    list_bad[f"{key[0]} scores"] += 1
            if len(got_lists) != len(ref_lists):
                list_bad["list count"] += 1
            total = sum(seen.values())
            print(f"{family}: {len(ref)} neurons, {total:,} values compared, {sum(bad.values())} differ; "
                  f"{len(ref_lists)} lists ({heads:,} kept entries compared), {sum(list_bad.values())} differ",
                  flush=True)
            for k, v in sorted((bad + list_bad).items()):
                print(f"    {k}: {v} of {seen.get(k.removesuffix('[len]'), '?')}")
            failures += sum(bad.values()) + sum(list_bad.values())
    finally:
        shutil.rmtree(root, ignore_errors=True)
        stop_embedded()
    print("check: " + ("every value agrees" if failures == 0 else f"{failures} values differ"))
    return 0 if failures == 0 else 1


def pass_diff(model_spec: str, corpus_path: Path, max_tokens: int, runs: list[str]) -> None:
    """The corpus pass of one model on CPU (compiled fold) and on CUDA (fp32, then bf16): how far apart."""
    import torch

    from catalog.corpus import load_corpus
    from catalog.extract.corpus_pass import corpus_pass
    from catalog.extract.pipeline import Parameters
    from catalog.extract.windows import tokenise
    from catalog.loading import load

    params = Parameters()
    results = []
    for device, dtype_name in (["cpu", "float32"], *(r.split(":") for r in runs)):
        dtype = getattr(torch, dtype_name)
        loaded = load(model_spec, device=device)
        model = loaded.model.to(dtype)
        tok = tokenise(load_corpus(corpus_path).documents, loaded.tokenizer, window=params.window,
                       max_tokens=max_tokens)
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        r = corpus_pass(model, loaded.view.value_projs(), tok, top_n=params.top_n, gated=loaded.view.gated,
                        batch_tokens=params.batch_tokens, pad=pad, key_projs=loaded.view.key_projs())
        results.append(((device, dtype_name), r))
        print(f"  pass on {device} {dtype}: {r.tokens} tokens in {r.seconds:.1f} s", flush=True)
    ref = results[0][1]
    for key, r in results[1:]:
        same_slot = slots = 0
        top_rel = mean_rel = 0.0
        pos_diff = hist_diff = gate_diff = 0
        for layer in range(len(ref.top)):
            a, b = ref.top[layer], r.top[layer]
            av, bv = a.values.cpu(), b.values.cpu().float()
            kept = av.isfinite() & bv.isfinite()
            top_rel = max(top_rel, float((av[kept] - bv[kept]).norm() / av[kept].norm()))
            same = (a.documents.cpu() == b.documents.cpu()) & (a.positions.cpu() == b.positions.cpu())
            same_slot += int(same.sum())
            slots += same.numel()
            sa, sb = ref.stats[layer], r.stats[layer]
            std = (sa.m2 / max(sa.count - 1, 1)).sqrt().clamp_min(1e-12).cpu()
            mean_rel = max(mean_rel, float(((sa.mean.cpu() - sb.mean.cpu()).abs() / std).max()))
            pos_diff += int((sa.positive.cpu() != sb.positive.cpu()).sum())
            fa, fb = ref.firing[layer], r.firing[layer]
            hist_diff += int((fa.abs_hist.cpu() - fb.abs_hist.cpu()).abs().sum()) // 2
            gate_diff += int((fa.gate_open.cpu() != fb.gate_open.cpu()).sum())
        n = ref.top[0].values.shape[0] * len(ref.top)
        print(f"{key[0]} {key[1]} against cpu float32, {n} neurons: top-N slots with the same trigger "
              f"{same_slot / slots:.4f}; top values ||diff|| / ||values|| (worst layer) {top_rel:.2e}; "
              f"means max |diff| / std {mean_rel:.2e}; positive counts differing {pos_diff} neurons; "
              f"|coefficient| histogram entries moved {hist_diff} of {ref.stats[0].count * n}; "
              f"gate-open counts differing {gate_diff} neurons", flush=True)


def shaped(like: Path, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(like)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in like.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {config.model_type}, {n / 1e6:.1f}M parameters, random (seed {seed}), {like}'s shapes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--families", default="gpt2,gpt_neox,opt,llama")
    c.add_argument("--max-tokens", type=int, default=3000)
    c.add_argument("--against", default="cuda", choices=["cuda", "cpu"])
    s = sub.add_parser("shaped")
    s.add_argument("--like", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("pass")
    d.add_argument("--model", required=True)
    d.add_argument("--corpus", type=Path, default=REPO / "data" / "wordnet.txt")
    d.add_argument("--max-tokens", type=int, default=4000)
    d.add_argument("--runs", default="cuda:float32,cuda:bfloat16", help="device:dtype,... against cpu:float32")
    args = ap.parse_args()
    if args.cmd == "pass":
        importlib.import_module("catalog")
        pass_diff(args.model, args.corpus, args.max_tokens, args.runs.split(","))
        return
    if args.cmd == "check":
        tmp = None
        if "CATALOG_DATABASE_URL" not in os.environ and "CATALOG_DATA_DIR" not in os.environ:
            tmp = tempfile.TemporaryDirectory(prefix="nc-cuda-db-")
            os.environ["CATALOG_DATA_DIR"] = tmp.name
        importlib.import_module("catalog")
        rc = check(args.families.split(","), args.max_tokens, args.against)
        if tmp is not None:
            tmp.cleanup()
        sys.exit(rc)
    shaped(args.like, args.out, args.seed)


if __name__ == "__main__":
    main()
