"""Part 7: the compose stack's cold start, its image sizes, and an extraction through a worker
container against the same extraction in a host process (docs/benchmarks.md, "Part 7").

    .venv/bin/python bench/part7_compose.py [--no-cache-build] [--pairs 2] [--max-tokens 1000]

Everything goes through scripts/compose.sh, as a user's commands do, on a project of its own
(removed with `down -v` at the end). Prints:
- build times: with the layer cache (nothing changed) and, with --no-cache-build, from nothing but
  the base images (`build --no-cache`);
- `up -d` until every service is healthy, from a stack with no volumes;
- the images' sizes;
- an extraction of the packaged SmolLM2 over --max-tokens tokens of the WordNet demo corpus, in
  pairs run back to back (container, host, container, host, ...): each pair's ratio container/host,
  then the median ratio. --warmup N unmeasured runs of each first warm the caches; with 0, both
  start cold (each converts the GGUF file once into its own data directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPOSE = ["bash", str(REPO / "scripts" / "compose.sh"), "-p", "ncbench7"]
IMAGES = ("neuron-catalog-api", "neuron-catalog-worker", "neuron-catalog-db", "neuron-catalog-redis")
SERVICES = ("db", "redis", "api", "worker")


def sh(cmd: list[str], env: dict[str, str], **kw: object) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def healthy(env: dict[str, str]) -> bool:
    ids = subprocess.run(["docker", "ps", "-q", "--filter", "label=com.docker.compose.project=ncbench7"],
                         capture_output=True, text=True, check=True).stdout.split()
    if not ids:
        return False
    seen = {s: False for s in SERVICES}
    for c in json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout):
        s = c["Config"]["Labels"]["com.docker.compose.service"]
        if s in seen and (c["State"].get("Health") or {}).get("Status") == "healthy":
            seen[s] = True
    return all(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-cache-build", action="store_true", help="also time `build --no-cache` (minutes)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each first (0: both start cold)")
    ap.add_argument("--max-tokens", type=int, default=1000)
    args = ap.parse_args()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "CATALOG_", "NC_"))},
           "POSTGRES_PASSWORD": secrets.token_urlsafe(12), "NC_API_PORT": "18087"}
    print(f"# part 7 compose bench, {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores")
    targets = ["build", "db", "redis", "api", "worker"]
    sh([*COMPOSE, *targets], env)  # whatever the cache lacks
    if args.no_cache_build:
        print(f"build --no-cache (from the base images): {sh([*COMPOSE, targets[0], '--no-cache', *targets[1:]], env):.0f} s")
    print(f"build with the layer cache (nothing changed): {sh([*COMPOSE, *targets], env):.1f} s")
    for image in IMAGES:
        size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True,
                                  text=True, check=True).stdout)
        print(f"image {image}: {size / 1e6:.0f} MB")
    sh([*COMPOSE, "down", "-v"], env)
    t = time.perf_counter()
    sh([*COMPOSE, "up", "-d", "--scale", "worker=1"], env)
    while not healthy(env):
        if time.perf_counter() - t > 600:
            sys.exit("not healthy after 600 s")
        time.sleep(0.5)
    print(f"up -d to every service healthy (no volumes yet): {time.perf_counter() - t:.1f} s")

    corpus = REPO / "data" / "wordnet.txt"
    sh([*COMPOSE, "run", "--rm", "--no-deps", "-v", f"{corpus.parent}:/in:ro", "worker", "sh", "-c",
        "cp /in/wordnet.txt /data/wordnet.txt"], env)
    opts = ["--model", "smollm2", "--corpus", "{corpus}", "--max-tokens", str(args.max_tokens)]
    in_container = [*COMPOSE, "run", "--rm", "--no-deps", "-T", "worker", "neuron-catalog", "extract", "--distributed",
                    *[o.replace("{corpus}", "/data/wordnet.txt") for o in opts]]
    with tempfile.TemporaryDirectory() as data:
        host_env = {**env, "CATALOG_DATA_DIR": data, "HF_HUB_OFFLINE": "1"}
        on_host = [str(REPO / ".venv" / "bin" / "neuron-catalog"), "extract", *[o.replace("{corpus}", str(corpus)) for o in opts]]
        for _ in range(args.warmup):  # GGUF conversion, embedded Postgres, caches
            sh(in_container, env), sh(on_host, host_env)
        ratios = []
        for i in range(args.pairs):
            c, h = sh(in_container, env), sh(on_host, host_env)
            ratios.append(c / h)
            print(f"pair {i + 1}: through a worker container {c:.1f} s, host process {h:.1f} s, ratio {c / h:.2f}")
    print(f"extraction, SmolLM2 over {args.max_tokens} tokens: median ratio container/host "
          f"{statistics.median(ratios):.2f} over {len(ratios)} pairs")
    sh([*COMPOSE, "down", "-v"], env)


if __name__ == "__main__":
    main()
