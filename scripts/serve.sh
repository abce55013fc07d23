#!/usr/bin/env bash
# One command for a local Prefect service: a server (SQLite, UI at http://127.0.0.1:$PORT),
# the `alignet-process` work pool, every deployment of deployments/prefect.yaml, and a worker that runs
# only those deployments (flows/worker.py). Runs in the foreground until Ctrl-C (or SIGTERM).
#
#   scripts/serve.sh                 # or: make serve
#   PORT=4300 scripts/serve.sh       # another port
#
# Stopping: the first Ctrl-C or SIGTERM stops everything it started, in order, within about a minute:
# the worker is frozen (it takes no new run), the runs in flight are ended with every process they
# started and marked Crashed with the reason (their concurrency slots free), then the worker and the
# server stop. If this script is killed outright (SIGKILL), a watchdog (alignet_core/runtime/lifeline.py)
# ends every process it started, and the next start marks the runs it left open Crashed before its
# worker starts. One service per Prefect home ($PREFECT_HOME/serve.lock).
#
# Locked down: the API needs the auth string generated on the first serve and kept in
# $PREFECT_HOME/api-auth-string (mode 600; .prefect/ is gitignored; the UI asks for it once),
# CSRF protection is on and CORS admits only the UI's own origin. The Prefect home (the database with every
# run's parameters and logs, the auth string, Prefect's result files) is private to this user: created with
# umask 077, and an existing one (made by `make demo`, or an older serve.sh) tightened on every start.
#
# Then, from another shell (same PREFECT_API_URL, and the auth string):
#   export PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_API_AUTH_STRING="$(cat .prefect/api-auth-string)"
#   .venv/bin/prefect deployment run 'alignet/regenerate-dataset' --watch
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-$PWD/.venv/bin}"
PORT="${PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PWD  # deployments pull into the directory they were deployed from

# everything this script creates is private (umask 077); the worker gets the caller's umask back, so the data
# its runs write keeps the modes the user chose
CALLER_UMASK="$(umask)"
umask 077
mkdir -p "$PREFECT_HOME"
chmod -R go-rwx "$PREFECT_HOME" || { echo "serve: cannot make $PREFECT_HOME private to $(id -un) (chmod failed)" >&2; exit 1; }

AUTH_FILE="$PREFECT_HOME/api-auth-string"
if [ ! -s "$AUTH_FILE" ]; then
  "$BIN/python" -c "import secrets; print(secrets.token_urlsafe(32))" > "$AUTH_FILE"
  echo "serve: generated the API auth string in $AUTH_FILE"
fi
PREFECT_SERVER_API_AUTH_STRING="$(cat "$AUTH_FILE")"
export PREFECT_SERVER_API_AUTH_STRING PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"
export PREFECT_SERVER_CSRF_PROTECTION_ENABLED=true PREFECT_CLIENT_CSRF_SUPPORT_ENABLED=true
export PREFECT_SERVER_CORS_ALLOWED_ORIGINS="http://127.0.0.1:${PORT}"
# SQLite under a busy machine: wait longer for its lock (the CSRF tokens add writes)
export PREFECT_SERVER_DATABASE_TIMEOUT="${PREFECT_SERVER_DATABASE_TIMEOUT:-60}"

exec 9>"$PREFECT_HOME/serve.lock"
flock -n 9 || { echo "serve: another serve.sh runs on $PREFECT_HOME (it holds $PREFECT_HOME/serve.lock)" >&2; exit 1; }

# Everything started below carries this token; the watchdog ends every carrier when this script exits.
ALIGNET_LIFELINE="serve-$$-$("$BIN/python" -c 'import secrets; print(secrets.token_hex(8))')"
export ALIGNET_LIFELINE
setsid "$BIN/python" -m alignet_core.runtime.lifeline $$ "$ALIGNET_LIFELINE" 9>&- </dev/null >/dev/null 2>&1 &

# a step in the background, waited for: bash would defer a signal until a foreground command ends
waited() { "$@" 9>&- & wait $!; }

SERVER="" WORKER="" STOPPING=""
stop() {  # the first INT/TERM (or an error): a bounded, ordered stop; later signals are ignored meanwhile
  local rc=$1
  [ -n "$STOPPING" ] && return
  STOPPING=1
  trap '' INT TERM
  echo "serve: stopping: runs in flight are ended and marked Crashed, then the worker and the server stop"
  if [ -n "$WORKER" ]; then
    kill -STOP "$WORKER" 2>/dev/null || true  # frozen: it takes no new run while the runs are closed
    timeout 120 "$BIN/python" -m flows.service close --reason stopped 9>&- || echo "serve: closing the runs failed" >&2
    kill -KILL "$WORKER" 2>/dev/null || true
    wait "$WORKER" 2>/dev/null || true
  fi
  if [ -n "$SERVER" ]; then
    kill -TERM -- "-$SERVER" 2>/dev/null || true  # the server's own session: prefect and its uvicorn
    for _ in $(seq 30); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  echo "serve: stopped"
  exit "$rc"
}
trap 'stop 0' INT TERM
trap 'stop $?' EXIT

# Each in its own session: a Ctrl-C in this terminal reaches this script only, which stops them in order.
setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" 9>&- &
SERVER=$!

for _ in $(seq 180); do
  if waited "$BIN/python" -c "import httpx,sys; sys.exit(httpx.get('$PREFECT_API_URL/health', timeout=2).status_code != 200)" 2>/dev/null; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { echo "serve: the Prefect server exited" >&2; exit 1; }
  waited sleep 1
done
# runs a stopped (or killed) service left open hold their deployments' slots: end and crash them first
for attempt in 1 2 3; do  # SQLite busy (503) under load: retried
  waited "$BIN/python" -m flows.service close --reason restarted && break
  [ "$attempt" = 3 ] && { echo "serve: closing the runs a stopped service left open failed three times" >&2; exit 1; }
  sleep 5
done
waited "$BIN/prefect" work-pool create alignet-process --type process --overwrite
# Deploying imports every flow (minutes on a busy machine): skipped when the server already holds every
# deployment as declared and as the last deploy stored it (every field that decides what runs: pull steps,
# entrypoint, job variables, parameters, parameter schema and its enforcement, ...), and nothing their
# parameters derive from changed since.
STAMP="$PREFECT_HOME/deployed.sha256"
WANT="$( (echo "$PWD"; cat deployments/prefect.yaml flows/*.py alignet_core/config/*.py; "$BIN/python" -c \
  'import prefect; print(prefect.__version__)') | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && waited "$BIN/python" -m flows.service deployed; then
  echo "serve: the deployments are up to date (deployments/prefect.yaml and the flows unchanged)"
else
  rm -f "$STAMP"
  # A deployment refused with 503 (SQLite busy: a deferred write loses to the server's own services' commits,
  # for minutes on a loaded machine) is retried with a growing pause; deploying is idempotent.
  for attempt in 1 2 3 4 5 6; do
    waited "$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml && break
    [ "$attempt" = 6 ] && { echo "serve: deploying failed six times" >&2; exit 1; }
    echo "serve: deploying failed (attempt $attempt of 6); retrying in $((attempt * 10)) s" >&2
    waited sleep $((attempt * 10))
  done
  for attempt in 1 2 3; do  # what the deploy stored, for the next start's check (SQLite busy: retried)
    waited "$BIN/python" -m flows.service record && break
    [ "$attempt" = 3 ] && { echo "serve: recording the deployments failed three times" >&2; exit 1; }
    sleep 5
  done
  echo "$WANT" > "$STAMP"
fi
echo "serve: UI at http://127.0.0.1:${PORT} (sign in with the string in $AUTH_FILE); API ${PREFECT_API_URL}; starting the worker"
(umask "$CALLER_UMASK" && exec setsid "$BIN/python" -m flows.worker 9>&-) &
WORKER=$!
while kill -0 "$WORKER" 2>/dev/null && kill -0 "$SERVER" 2>/dev/null; do
  sleep 2 9>&- & wait $! || true  # wakes on a signal at once
done
echo "serve: the $(kill -0 "$WORKER" 2>/dev/null && echo server || echo worker) exited" >&2
stop 1
