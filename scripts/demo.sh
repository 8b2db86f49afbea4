#!/usr/bin/env bash
# The main job: a real Dagster run (celery_k8s_job_executor, Postgres-backed instance) executed by a
# celeriac worker on the embedded defaults (RabbitMQ + rpc://, local process launcher).
#   CELERIAC_DEMO_BROKER=redis://127.0.0.1:6379/5 CELERIAC_DEMO_BACKEND=redis://127.0.0.1:6379/5 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${CELERIAC_CACHE:-$HOME/.cache/celeriac}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
BROKER="${CELERIAC_DEMO_BROKER:-amqp://guest:guest@127.0.0.1:5672//}"
BACKEND="${CELERIAC_DEMO_BACKEND:-rpc://}"
JOB="${CELERIAC_DEMO_JOB:-diamond}"
QUEUE="celeriac_demo"

bash scripts/services.sh
VENV="$(bash scripts/python-peers.sh)"
cargo build --bin celeriac
BIN="$CARGO_TARGET_DIR/debug/celeriac"

HOME_DIR="$CACHE/demo"
rm -rf "$HOME_DIR" && mkdir -p "$HOME_DIR"
export PATH="$VENV/bin:$PATH" DAGSTER_PG_PASSWORD="${DAGSTER_PG_PASSWORD:-demo}" CELERIAC_QUEUE="$QUEUE"
"$VENV/bin/python" tests/peers/make_instance.py "$HOME_DIR" --db celeriac_demo --broker "$BROKER" --backend "$BACKEND"

echo "== starting celeriac worker (broker $BROKER, backend $BACKEND, queue $QUEUE)"
"$BIN" worker -b "$BROKER" --result-backend "$BACKEND" -Q "$QUEUE" -c 4 --http-addr 127.0.0.1:0 \
  >"$HOME_DIR/worker.log" 2>&1 &
WORKER=$!
trap 'kill -TERM $WORKER 2>/dev/null; wait $WORKER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q "consuming" "$HOME_DIR/worker.log" && break; sleep 0.2; done

echo "== running Dagster job '$JOB' with celery_k8s_job_executor"
SUMMARY="$("$VENV/bin/python" tests/peers/run_job.py --home "$HOME_DIR" --job "$JOB" --timeout 300 2>"$HOME_DIR/run.log")"
echo "$SUMMARY" | "$VENV/bin/python" -c '
import json, sys
s = json.loads(sys.stdin.read().strip().splitlines()[-1])
print("run", s["run_id"], "->", s["status"])
for e in s["step_events"]:
    print("  %-14s %s" % (e["event_type"], e["step_key"]))
sys.exit(0 if s["status"] == "SUCCESS" else 1)
'
echo "== logs: $HOME_DIR/worker.log (celeriac), $HOME_DIR/run.log (Dagster run)"
