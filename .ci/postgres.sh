#!/usr/bin/env bash
# Throwaway PostgreSQL server for the tests (CI runs it before `make test`; also usable by hand).
#
#   .ci/postgres.sh                   install PostgreSQL with apt-get when missing, start a fresh
#                                     server on 127.0.0.1 and print ONE line on stdout: its
#                                     SQLAlchemy URL, e.g.
#                                     postgresql+psycopg://moebench:moebench@127.0.0.1:55432/moebench
#   .ci/postgres.sh stop URL|DATA_DIR stop that server and delete its temp dir (no-op when gone)
#
# Usage:  export MOE_BENCH_TEST_POSTGRES_URL="$(.ci/postgres.sh)"
#         ... run tests ...
#         .ci/postgres.sh stop "$MOE_BENCH_TEST_POSTGRES_URL"
#
# The server listens on 127.0.0.1 only (plus a Unix socket inside its data dir), port $PG_PORT or
# the first free one from 55432 up; superuser role `moebench` (password `moebench`, may create
# databases) owns database `moebench`. Data lives in a new temp dir under ${PG_TMPDIR:-/tmp}, with
# fsync off: for tests only. As root, initdb and the server run as the `postgres` OS user
# (PostgreSQL refuses root). Everything except the URL goes to stderr.
set -euo pipefail

ROLE=moebench
PASSWORD=moebench
DATABASE=moebench
FIRST_PORT=55432

log() { echo "postgres.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

bindir() {  # newest installed /usr/lib/postgresql/<version>/bin, or nothing
    local found
    found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [[ -n "$found" && -x "$found/initdb" ]]; then echo "$found"; fi
}

ensure_installed() {
    [[ -n "$(bindir)" ]] && return 0
    log "PostgreSQL is not installed: installing Debian's postgresql package with apt-get"
    local sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null || die "run as root, or install PostgreSQL first (apt-get install postgresql)"
        sudo=(sudo)
    fi
    # No default cluster on 5432: this script makes its own (only set when nobody configured it).
    if [[ ! -e /etc/postgresql-common/createcluster.d/moebench.conf ]]; then
        "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" | "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/moebench.conf >/dev/null
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q >&2
    "${sudo[@]}" apt-get install -y -q --no-install-recommends postgresql >&2
    [[ -n "$(bindir)" ]] || die "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb exists"
}

# Run a server-side command as the data dir's owner: `postgres` when we are root, else ourselves.
# From / so the postgres user never needs access to the caller's working directory.
as_owner() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    ensure_installed
    local bin; bin="$(bindir)"
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/sh postgres
    fi

    local port
    if [[ -n "${PG_PORT:-}" ]]; then
        port="$PG_PORT"
        port_in_use "$port" && die "port $port (PG_PORT) on 127.0.0.1 is already in use"
    else
        port="$FIRST_PORT"
        while port_in_use "$port"; do
            port=$((port + 1))
            ((port < FIRST_PORT + 100)) || die "no free port in $FIRST_PORT..$((FIRST_PORT + 99)) on 127.0.0.1"
        done
    fi

    local base data
    base="$(mktemp -d "${PG_TMPDIR:-/tmp}/moebench-pg.XXXXXX")"
    data="$base/data"
    chmod 755 "$base"
    printf '%s\n' "$PASSWORD" > "$base/pwfile"
    [[ $EUID -eq 0 ]] && chown -R postgres:postgres "$base"

    log "initdb ($bin) into $data"
    as_owner "$bin/initdb" -D "$data" -U "$ROLE" --pwfile="$base/pwfile" -E UTF8 --no-locale --no-sync \
        --auth-local=trust --auth-host=scram-sha-256 >"$base/initdb.log" 2>&1 \
        || { cat "$base/initdb.log" >&2; die "initdb failed (log above)"; }
    rm -f "$base/pwfile"
    cat >> "$data/postgresql.conf" <<EOF

# .ci/postgres.sh: throwaway test server
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF

    log "starting on 127.0.0.1:$port (log: $base/postgres.log)"
    if ! as_owner "$bin/pg_ctl" -D "$data" -l "$base/postgres.log" -w -t 60 start >&2; then
        cat "$base/postgres.log" >&2 || true
        die "the server did not start (log above); data dir $data"
    fi
    local i
    for ((i = 0; i < 60; i++)); do
        "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U "$ROLE" -d postgres && break
        sleep 0.5
    done
    "$bin/pg_isready" -h 127.0.0.1 -p "$port" -U "$ROLE" -d postgres >&2 \
        || die "the server does not accept connections on 127.0.0.1:$port (log: $base/postgres.log)"
    PGPASSWORD="$PASSWORD" "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$ROLE" -O "$ROLE" "$DATABASE" >&2

    log "ready; data dir $data; stop with: $0 stop $data"
    echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$port/$DATABASE"
}

stop() {
    local target="${1:-}" data bin
    [[ -n "$target" ]] || die "usage: $0 stop URL|DATA_DIR"
    bin="$(bindir)"
    [[ -n "$bin" ]] || { log "PostgreSQL is not installed: nothing to stop"; return 0; }
    if [[ "$target" == *://* ]]; then
        # Ask the server where its data lives (psql wants a plain postgresql:// URL).
        data="$("$bin/psql" -X -q -A -t -c 'SHOW data_directory' "postgresql://${target#*://}" 2>/dev/null)" \
            || { log "no server answers at ${target%%:*}://...@${target#*@}: nothing to stop"; return 0; }
    else
        data="$target"
    fi
    [[ -f "$data/PG_VERSION" ]] || { log "$data is not a PostgreSQL data dir: nothing to stop"; return 0; }
    if [[ -f "$data/postmaster.pid" ]]; then
        log "stopping the server in $data"
        as_owner "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >&2
    fi
    local base; base="$(dirname "$data")"
    if [[ "$(basename "$base")" == moebench-pg.* && "$(basename "$data")" == data ]]; then
        rm -rf "$base"  # only temp dirs this script made
    fi
}

case "${1:-start}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 [start] | $0 stop URL|DATA_DIR" ;;
esac
