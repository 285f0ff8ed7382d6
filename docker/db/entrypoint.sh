#!/bin/sh
# First start: a cluster in the volume, the catalog database and user, pgvector created in it.
# Later starts: just the server. POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB as in the
# official postgres image; the password from the environment (compose reads .env).
set -eu
: "${POSTGRES_USER:=catalog}" "${POSTGRES_DB:=catalog}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "warning: POSTGRES_PASSWORD is not set; using the default password 'catalog' (set it in .env)" >&2
    POSTGRES_PASSWORD=catalog
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pw=$(mktemp)
    printf '%s' "$POSTGRES_PASSWORD" >"$pw"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pw"
    # Containers reach the server over the compose network: password (SCRAM) from any address.
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    psql -v ON_ERROR_STOP=1 -q -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "CREATE EXTENSION IF NOT EXISTS vector"
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "db: initialised $PGDATA (database $POSTGRES_DB, user $POSTGRES_USER, pgvector)" >&2
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
