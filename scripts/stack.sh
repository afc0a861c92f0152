#!/usr/bin/env bash
# The local development stack, on 127.0.0.1, its data under $STACK_DIR (default .stack/):
#   S3       scripts/s3_server.py (moto's S3, mirrored to $STACK_DIR/s3) on :9000, bucket polyinr
#   MLflow   tracking server, SQLite backend $STACK_DIR/mlflow.db, artifacts s3://polyinr/mlflow, :5000
#   Prefect  server ($STACK_DIR/prefect) on :4200, the `local` process work pool, the `local`
#            deployment of prefect.yaml and a worker for it
# The worker's flow runs keep checkpoints in s3://polyinr/checkpoints, log to the MLflow
# server and `dvc push` to s3://polyinr/dvc (.dvc/config's remote at this endpoint).
#
#   scripts/stack.sh up       start everything (a no-op for parts already running)
#   scripts/stack.sh down     stop in-flight flow runs (SIGTERM: training checkpoints, the run
#                             ends Crashed, its MLflow run KILLED), then everything; the data
#                             stays in $STACK_DIR
#   scripts/stack.sh status   what runs, where; `source $STACK_DIR/env` points a shell at it
#
# Ports: POLYINR_S3_PORT, POLYINR_MLFLOW_PORT, POLYINR_PREFECT_PORT. Commands come from
# $VENV/bin (default .venv) or else from PATH. Production runs none of this: the same flow
# reads PREFECT_API_URL, AWS_* and POLYINR_OVERRIDES from its environment (README).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STACK_DIR=$(mkdir -p "${STACK_DIR:-.stack}" && cd "${STACK_DIR:-.stack}" && pwd)
S3_PORT=${POLYINR_S3_PORT:-9000}
MLFLOW_PORT=${POLYINR_MLFLOW_PORT:-5000}
PREFECT_PORT=${POLYINR_PREFECT_PORT:-4200}
BUCKET=polyinr
if [[ -x ${VENV:-.venv}/bin/python ]]; then BIN=$(cd "${VENV:-.venv}/bin" && pwd); else
    BIN=$(dirname "$(command -v python)"); fi
export PATH="$BIN:$PATH"
say() { echo "stack: $*"; }

# The stack's environment: what the worker (and so every flow run) and a user's shell see.
# The S3 keys are placeholders the local server accepts; they grant nothing anywhere else.
write_env() {
    cat >"$STACK_DIR/env" <<EOF
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=local
export AWS_SECRET_ACCESS_KEY=local
export AWS_DEFAULT_REGION=us-east-1
export POLYINR_OVERRIDES='["storage.uri=s3://$BUCKET/checkpoints", "tracking.uri=http://127.0.0.1:$MLFLOW_PORT"]'
EOF
}

alive() { [[ -f $STACK_DIR/$1.pid ]] && kill -0 "$(<"$STACK_DIR/$1.pid")" 2>/dev/null; }

# start NAME CMD...: in its own session (so `down` stops its children too), logging to a file.
start() {
    local name=$1
    shift
    if alive "$name"; then say "$name already running (pid $(<"$STACK_DIR/$name.pid"))"; return; fi
    setsid "$@" >"$STACK_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$STACK_DIR/$name.pid"
    say "$name started (pid $!, log $STACK_DIR/$name.log)"
}

# claim NAME PORT VARIABLE: stop, naming the port, when another process listens on it (a
# foreign server there would get the stack's data); a running part of the stack keeps its own.
claim() {
    alive "$1" && return 0
    python - "$2" 2>/dev/null <<'PY' && return 0
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers: TIME_WAIT is free
s.bind(("127.0.0.1", int(sys.argv[1])))
PY
    say "port $2 for $1 is in use by another process: stop it or set $3 to a free port"
    exit 1
}

# wait_http NAME URL SECONDS [BODY]: until URL answers 200 (with BODY, when given: proof that
# the answering server is ours, not another on the port), or fail showing the log's end.
wait_http() {
    local name=$1 url=$2 deadline=$((SECONDS + $3)) body=${4:-}
    until python -c "import urllib.request as u, sys
answer = u.urlopen('$url', timeout=2).read().decode()
sys.exit(bool(sys.argv[1]) and answer != sys.argv[1])" "$body" 2>/dev/null && alive "$name"; do
        if ! alive "$name" || ((SECONDS > deadline)); then
            say "$name did not come up at $url; last lines of $STACK_DIR/$name.log:"
            tail -n 30 "$STACK_DIR/$name.log" >&2
            exit 1
        fi
        sleep 1
    done
    say "$name ready at $url"
}

up() {
    claim s3 "$S3_PORT" POLYINR_S3_PORT
    claim mlflow "$MLFLOW_PORT" POLYINR_MLFLOW_PORT
    claim prefect "$PREFECT_PORT" POLYINR_PREFECT_PORT
    write_env
    # shellcheck disable=SC1091
    source "$STACK_DIR/env"
    export PREFECT_HOME=$STACK_DIR/prefect
    # A token per server start, which only our S3 server answers (scripts/s3_server.py --token).
    alive s3 || python -c "import secrets; print(secrets.token_hex(16))" >"$STACK_DIR/s3.token"
    start s3 python "$ROOT/scripts/s3_server.py" --dir "$STACK_DIR/s3" --port "$S3_PORT" \
        --bucket "$BUCKET" --token "$(<"$STACK_DIR/s3.token")"
    start prefect prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    MLFLOW_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL start mlflow mlflow server \
        --backend-store-uri "sqlite:///$STACK_DIR/mlflow.db" \
        --artifacts-destination "s3://$BUCKET/mlflow" \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
    # Servers start in parallel; MLflow's artifact store needs the bucket, so S3 comes first.
    wait_http s3 "$AWS_ENDPOINT_URL/_polyinr/token" 30 "$(<"$STACK_DIR/s3.token")"
    wait_http s3 "$AWS_ENDPOINT_URL/$BUCKET" 30
    wait_http mlflow "$MLFLOW_TRACKING_URI/health" 120
    wait_http prefect "$PREFECT_API_URL/health" 120
    prefect work-pool inspect local >/dev/null 2>&1 ||
        prefect work-pool create local --type process >/dev/null
    prefect --no-prompt deploy --name local >"$STACK_DIR/deploy.log" 2>&1 ||
        { tail -n 30 "$STACK_DIR/deploy.log" >&2; exit 1; }
    say "deployment train-poly-inr/local registered (from $ROOT)"
    start worker prefect worker start --pool local
    status
    say "run:  source $STACK_DIR/env && prefect deployment run train-poly-inr/local"
}

# The worker's flow runs: Prefect's process worker starts each in a session of its own, so
# stopping the worker's group would leave them training against stopped servers. SIGTERM
# each run's group and wait (POLYINR_STOP_TIMEOUT, default 300 s) while training saves its
# checkpoint to S3, ends its MLflow run KILLED and Prefect marks the flow run Crashed.
stop_runs() {
    local pid runs deadline=$((SECONDS + ${POLYINR_STOP_TIMEOUT:-300}))
    alive worker || return 0
    runs=$(pgrep -P "$(<"$STACK_DIR/worker.pid")" || true)
    [[ -n $runs ]] || return 0
    for pid in $runs; do
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        say "flow run process $pid: SIGTERM (checkpoint, then Crashed)"
    done
    for pid in $runs; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL -- "-$pid" 2>/dev/null || true
            say "flow run process $pid: killed after ${POLYINR_STOP_TIMEOUT:-300} s"
        fi
    done
}

down() {
    local name pid
    stop_runs
    for name in worker mlflow prefect s3; do
        [[ -f $STACK_DIR/$name.pid ]] || continue
        pid=$(<"$STACK_DIR/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null || true
            say "$name stopped (pid $pid)"
        fi
        rm -f "$STACK_DIR/$name.pid"
    done
    say "data kept in $STACK_DIR (s3/, mlflow.db, prefect/); rm -rf it to start afresh"
}

status() {
    local name
    for name in s3 mlflow prefect worker; do
        if alive "$name"; then say "$name: running (pid $(<"$STACK_DIR/$name.pid"))"
        else say "$name: stopped"; fi
    done
    say "S3 http://127.0.0.1:$S3_PORT  MLflow http://127.0.0.1:$MLFLOW_PORT" \
        " Prefect http://127.0.0.1:$PREFECT_PORT  (env: $STACK_DIR/env)"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
