#!/bin/sh
# Append-only file in the volume; a password when REDIS_PASSWORD is set (needed once the port is
# published for workers on other machines).
set -eu
if [ -n "${REDIS_PASSWORD:-}" ]; then
    exec redis-server --dir /data --appendonly yes --protected-mode no --requirepass "$REDIS_PASSWORD" "$@"
fi
exec redis-server --dir /data --appendonly yes --protected-mode no "$@"
