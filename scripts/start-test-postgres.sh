#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1 for the feedback-app tests and print its URL.
#
#   export KILTER_TEST_PG_URL="$(scripts/start-test-postgres.sh)"
#   .venv/bin/pytest -q tests/app -m postgres
#   scripts/start-test-postgres.sh --stop       # stops the cluster this script started last
#
# Needs the Debian package `postgresql` (initdb and pg_ctl under /usr/lib/postgresql/*/bin).
# As root the cluster runs as the `postgres` user (PostgreSQL refuses to run as root).
# Authentication is `trust` on 127.0.0.1 only: this is a test database, never a real one.
set -euo pipefail

STATE=/tmp/kilter-test-postgres.dir
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z "$PGBIN" ]]; then
  echo "start-test-postgres: PostgreSQL not found; install it with: apt-get install -y postgresql" >&2
  exit 1
fi

as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ "${1:-}" == "--stop" ]]; then
  if [[ -f "$STATE" ]]; then
    dir=$(cat "$STATE")
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf "$dir" "$STATE"
  fi
  exit 0
fi

PORT=${KILTER_TEST_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DIR=$(mktemp -d /tmp/kilter-pg.XXXXXX)
chmod 755 "$DIR"
if [[ $(id -u) -eq 0 ]]; then chown postgres: "$DIR"; fi

as_owner "$PGBIN/initdb" -D "$DIR/data" -U kilter --auth=trust --encoding=UTF8 --no-locale >"$DIR/initdb.log" 2>&1 \
  || { cat "$DIR/initdb.log" >&2; exit 1; }
# fsync stays on (the default): the crash tests rely on committed data surviving
as_owner "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200" start >&2
as_owner "$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U kilter kilter_test
echo "$DIR" > "$STATE"
echo "start-test-postgres: running in $DIR (stop with: $0 --stop)" >&2
echo "postgresql://kilter@127.0.0.1:$PORT/kilter_test"
