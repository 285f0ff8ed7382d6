#!/bin/sh
# The application images' entrypoint: builds the database and broker URLs from the compose
# service names and the credentials in the environment (compose reads them from .env) unless
# CATALOG_DATABASE_URL / CATALOG_BROKER_URL are given whole, then runs the command.
set -eu
quote() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
if [ -z "${CATALOG_DATABASE_URL:-}" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "warning: POSTGRES_PASSWORD is not set; using the default password 'catalog' (set it in .env)" >&2
        POSTGRES_PASSWORD=catalog
    fi
    CATALOG_DATABASE_URL="postgresql://$(quote "${POSTGRES_USER:-catalog}"):$(quote "$POSTGRES_PASSWORD")@${POSTGRES_HOST:-db}:${POSTGRES_PORT:-5432}/${POSTGRES_DB:-catalog}"
    export CATALOG_DATABASE_URL
fi
if [ -z "${CATALOG_BROKER_URL:-}" ]; then
    auth=""
    [ -n "${REDIS_PASSWORD:-}" ] && auth=":$(quote "$REDIS_PASSWORD")@"
    export CATALOG_BROKER_URL="redis://${auth}${REDIS_HOST:-redis}:${REDIS_PORT:-6379}/0"
fi
exec "$@"
