#!/usr/bin/env bash
# One command for a local Prefect service: a server (SQLite, UI at http://127.0.0.1:$PORT),
# the `alignet-process` work pool, every deployment of deployments/prefect.yaml, and a worker.
# Runs in the foreground until Ctrl-C (or SIGTERM), then stops the server it started.
#
#   scripts/serve.sh                 # or: make serve
#   PORT=4300 scripts/serve.sh       # another port
#
# Locked down: the API needs the auth string generated on the first serve and kept in
# $PREFECT_HOME/api-auth-string (mode 600; .prefect/ is gitignored; the UI asks for it once),
# CSRF protection is on and CORS admits only the UI's own origin.
#
# Then, from another shell (same PREFECT_API_URL, and the auth string):
#   export PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_API_AUTH_STRING="$(cat .prefect/api-auth-string)"
#   .venv/bin/prefect deployment run 'alignet/demo' --watch
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-$PWD/.venv/bin}"
PORT="${PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PWD  # deployments pull into the directory they were deployed from

AUTH_FILE="$PREFECT_HOME/api-auth-string"
if [ ! -s "$AUTH_FILE" ]; then
  mkdir -p "$PREFECT_HOME"
  (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_urlsafe(32))" > "$AUTH_FILE")
  echo "serve: generated the API auth string in $AUTH_FILE"
fi
PREFECT_SERVER_API_AUTH_STRING="$(cat "$AUTH_FILE")"
export PREFECT_SERVER_API_AUTH_STRING PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"
export PREFECT_SERVER_CSRF_PROTECTION_ENABLED=true PREFECT_CLIENT_CSRF_SUPPORT_ENABLED=true
export PREFECT_SERVER_CORS_ALLOWED_ORIGINS="http://127.0.0.1:${PORT}"
# SQLite under a busy machine: wait longer for its lock (the CSRF tokens add writes)
export PREFECT_SERVER_DATABASE_TIMEOUT="${PREFECT_SERVER_DATABASE_TIMEOUT:-60}"

"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT INT TERM

for _ in $(seq 180); do
  if "$BIN/python" -c "import httpx,sys; sys.exit(httpx.get('$PREFECT_API_URL/health', timeout=2).status_code != 200)" 2>/dev/null; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { echo "serve: the Prefect server exited" >&2; exit 1; }
  sleep 1
done
"$BIN/prefect" work-pool create alignet-process --type process --overwrite
for attempt in 1 2 3; do  # a deployment refused with 503 (SQLite busy) is retried; deploying is idempotent
  "$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml && break
  [ "$attempt" = 3 ] && { echo "serve: deploying failed three times" >&2; exit 1; }
  sleep 5
done
echo "serve: UI at http://127.0.0.1:${PORT} (sign in with the string in $AUTH_FILE); API ${PREFECT_API_URL}; starting the worker"
"$BIN/prefect" worker start --pool alignet-process &
WORKER=$!
trap 'kill $WORKER $SERVER 2>/dev/null; wait $WORKER $SERVER 2>/dev/null' EXIT INT TERM
wait $WORKER
