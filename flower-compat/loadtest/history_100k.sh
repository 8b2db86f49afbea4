#!/usr/bin/env bash
# End-to-end load test: a real `celeriac flower` on Redis receives 100,000 task lifecycles (received,
# started, succeeded/failed: 300,000 Celery events from 20 simulated workers, sent by kombu's own event
# dispatcher), then reports the process's resident memory and the latency of /api/tasks?limit=100.
#
#   bash flower-compat/loadtest/history_100k.sh            # uses $CELERIAC_BIN or the cached build
#   TASKS=20000 bash flower-compat/loadtest/history_100k.sh
#
# Needs Redis on 127.0.0.1:6379 and the Python peers' venv (scripts/python-peers.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
TASKS="${TASKS:-100000}"
DB="${DB:-15}"
PORT="${PORT:-15599}"
BROKER="redis://127.0.0.1:6379/$DB"
VENV="$(bash scripts/python-peers.sh)"
TARGET="${CARGO_TARGET_DIR:-${CELERIAC_CACHE:-$HOME/.cache/celeriac}/target}"
BIN="${CELERIAC_BIN:-}"
if [ -z "$BIN" ]; then
  for b in "$TARGET/release/celeriac" "$TARGET/debug/celeriac"; do [ -x "$b" ] && { BIN=$b; break; }; done
fi
[ -x "$BIN" ] || { echo "no celeriac binary (build it or set CELERIAC_BIN)" >&2; exit 1; }
LOG="$(mktemp /tmp/flower-loadtest.XXXXXX.log)"
"$BIN" flower -b "$BROKER" --port "$PORT" --address 127.0.0.1 --max-tasks "$TASKS" --no-enable-events >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/healthcheck" >/dev/null && break; sleep 0.2; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
echo "binary: $BIN"
echo "idle RSS: $(rss) KiB"
"$VENV/bin/python" - "$BROKER" "$TASKS" "$PORT" <<'PY'
import json, sys, time, urllib.request
from celery import Celery
broker, n, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = Celery(broker=broker)
kw_head = "{'execute_step_args_packed': {'__class__': 'ExecuteStepArgs', 'pipeline_origin': {'__class__': 'PipelinePythonOrigin', 'pipeline_name': 'job_%d', 'repository_origin': {...}}, 'pipeline_run_id': '%08x-6cab-4ef7-9f6b-ee3c7a9eef4a', 'step_keys_to_execute': ['step_%d'], 'instance_ref': {"
result = "'[" + ", ".join(['"{\\"__class__\\": \\"DagsterEvent\\", \\"event_type_value\\": \\"STEP_OUTPUT\\"}"'] * 12) + "]'"
start = time.time()
with app.connection_for_write() as conn:
    ds = [app.events.Dispatcher(conn, hostname=f"celeriac-{w}@load-{w}", buffer_while_offline=False) for w in range(20)]
    for i in range(n):
        d = ds[i % 20]
        uuid = f"{i:08x}-0000-4000-8000-{i:012x}"
        kw = (kw_head % (i % 50, i // 6, i % 6)).ljust(1020, "x")[:1020] + "...}"
        d.send("task-received", uuid=uuid, name="execute_step_k8s_job", args="()", kwargs=kw, root_id=uuid,
               parent_id=None, retries=0, eta=None, expires=None)
        d.send("task-started", uuid=uuid)
        if i % 10 == 0:
            d.send("task-failed", uuid=uuid, exception="Failure('step failed')", traceback="Traceback (most recent call last):\n  ...\n")
        else:
            d.send("task-succeeded", uuid=uuid, result=result, runtime=29.0)
        if i % 2000 == 1999:
            # Stay under Redis's pub/sub output-buffer limit: wait for flower-compat to catch up.
            while True:
                page = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/celeriac/tasks?limit=1"))
                if page["total"] >= i - 2000:
                    break
                time.sleep(0.05)
print(f"sent {3 * n} events in {time.time() - start:.1f} s")
deadline = time.time() + 120
while time.time() < deadline:
    page = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/celeriac/tasks?limit=1"))
    if page["total"] >= n:
        break
    time.sleep(0.5)
print(f"tasks held: {page['total']}")
lat = []
for _ in range(50):
    t = time.perf_counter()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks?limit=100").read()
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print(f"/api/tasks?limit=100: {len(json.loads(body))} tasks, {len(body)//1024} KiB; "
      f"median {lat[len(lat)//2]:.1f} ms, p95 {lat[int(len(lat)*0.95)]:.1f} ms, max {lat[-1]:.1f} ms")
PY
echo "RSS with $TASKS tasks: $(rss) KiB"
