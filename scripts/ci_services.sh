#!/usr/bin/env bash
# Start the services some tests use: a throw-away PostgreSQL on loopback, for the
# multi-machine study tests (tests/search/test_workers.py); and, best effort, install headless
# Chromium (Debian's chromium) for the report rendering tests (tests/report).
#
# On success the server's URL is written to .ci-postgres-url in the repository root (and,
# under GitHub Actions, exported as MPSEARCH_TEST_POSTGRES_URL through $GITHUB_ENV); the tests
# read the variable first, then the file. Where no server can be started the script says why,
# removes the file and exits 0: the tests that need it skip with that reason.
#
#   scripts/ci_services.sh          start (idempotent: reuses a server already running on the port)
#   scripts/ci_services.sh stop     stop it and delete its data
#
# PostgreSQL refuses to run as root, so as root the server runs as the 'postgres' user
# (created by the Debian package). Port: $MPSEARCH_PG_PORT (default 54329), data under
# $MPSEARCH_PG_DIR (default /tmp/mpsearch-ci-postgres).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL_FILE="$ROOT/.ci-postgres-url"
PORT="${MPSEARCH_PG_PORT:-54329}"
BASE="${MPSEARCH_PG_DIR:-/tmp/mpsearch-ci-postgres}"
DATA="$BASE/data"
SOCK="$BASE/sock"
DB="mpsearch_test"

say() { echo "ci_services: $*"; }
give_up() {
    say "PostgreSQL not started: $*"
    say "tests that need PostgreSQL will be skipped with this reason."
    rm -f "$URL_FILE"
    mkdir -p "$BASE" 2>/dev/null && echo "$*" >"$BASE/why-not" 2>/dev/null
    exit 0
}

find_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

as_owner() {  # run a command as the server's owner (postgres when we are root)
    if [ "$(id -u)" = "0" ]; then
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
        fi
    else
        "$@"
    fi
}

ensure_chromium() {  # headless Chromium for the report rendering test: best effort, never fatal
    local c
    for c in chromium chromium-browser google-chrome; do
        if command -v "$c" >/dev/null 2>&1; then say "Chromium: $(command -v "$c")"; return 0; fi
    done
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        say "installing chromium from the Debian packages (for tests/report)"
        if timeout 900 apt-get install -y -q chromium >/dev/null 2>&1 ||
            { timeout 300 apt-get update -q >/dev/null 2>&1 &&
                timeout 900 apt-get install -y -q chromium >/dev/null 2>&1; }; then
            say "Chromium installed"
            return 0
        fi
        say "chromium could not be installed; the report rendering tests will be skipped"
    else
        say "no Chromium and no root apt-get to install it; the report rendering tests will be skipped"
    fi
    return 0
}
[ "${1:-}" = "stop" ] || ensure_chromium

BIN="$(find_bin)"
if [ "${1:-}" = "stop" ]; then
    [ -n "$BIN" ] && [ -d "$DATA" ] && as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1
    rm -rf "$BASE" "$URL_FILE"
    say "stopped"
    exit 0
fi

if [ -z "$BIN" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        say "installing postgresql from the Debian packages"
        (apt-get install -y -q postgresql >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; }) ||
            give_up "apt-get install postgresql failed"
        BIN="$(find_bin)" || give_up "postgresql installed but no initdb/pg_ctl found"
    else
        give_up "no PostgreSQL binaries (initdb, pg_ctl) and no root apt-get to install them"
    fi
fi

if [ "$(id -u)" = "0" ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir "$BASE" --shell /bin/sh postgres 2>/dev/null ||
        give_up "running as root and no 'postgres' user to run the server"
fi

PGURL="postgresql://postgres@127.0.0.1:$PORT/$DB"
if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" 2>/dev/null; then
    # started before, by this checkout or another one (the data directory is shared)
    say "reusing the server running on 127.0.0.1:$PORT"
else
    mkdir -p "$BASE" "$SOCK" || give_up "cannot create $BASE"
    [ "$(id -u)" = "0" ] && chown -R postgres "$BASE"
    if [ ! -f "$DATA/PG_VERSION" ]; then
        as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --no-sync \
            >"$BASE/initdb.log" 2>&1 || give_up "initdb failed: $(tail -n 3 "$BASE/initdb.log")"
    fi
    # fsync off: a throw-away test server, speed over durability
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$BASE/server.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK -c fsync=off -c max_connections=200" \
        start >/dev/null 2>&1 || give_up "the server did not start: $(tail -n 3 "$BASE/server.log")"
fi
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 20 || give_up "the server does not answer on port $PORT"
if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" postgres | grep -q 1; then
    "$BIN/psql" -q -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE $DB" postgres ||
        give_up "CREATE DATABASE $DB failed"
fi

# the Python driver Optuna's RDBStorage needs (the 'postgres' extra of mpsearch)
PY="${PYTHON:-python}"
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c "import psycopg2" >/dev/null 2>&1; then
    "$PY" -m pip install -q psycopg2-binary >/dev/null 2>&1 || say "warning: psycopg2 is not importable and pip could not install psycopg2-binary"
fi

echo "$PGURL" >"$URL_FILE"
rm -f "$BASE/why-not"
[ -n "${GITHUB_ENV:-}" ] && echo "MPSEARCH_TEST_POSTGRES_URL=$PGURL" >>"$GITHUB_ENV"
say "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT"
echo "MPSEARCH_TEST_POSTGRES_URL=$PGURL"
