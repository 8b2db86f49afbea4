#!/usr/bin/env bash
# Re-captures the committed Dagster version fixtures (dagster/tests/fixtures/versions/<version>/) with
# each release's own venv (scripts/dagster-versions.sh; 1.13.27 = the project venv) and Python's own
# code: the step tasks celery_k8s_job_executor publishes (read from a queue nobody consumes), a step
# process's log and Dagster's filtering of it, construct_dagster_k8s_job bodies, the k8s config shapes.
# Needs RabbitMQ and Postgres (scripts/services.sh). Not part of the test run: the fixtures are data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
BROKER=amqp://guest:guest@127.0.0.1:5672//
capture() { # capture <version> <venv>
  local v=$1 venv=$2 db home
  db="capture_${v//./_}_$$"
  home="$(mktemp -d)"
  "$venv/bin/python" tests/peers/make_instance.py "$home" --db "$db" --broker "$BROKER" --backend rpc:// >/dev/null
  rm -rf "dagster/tests/fixtures/versions/$v"
  DAGSTER_PG_PASSWORD=unused "$venv/bin/python" tests/peers/capture_version.py --home "$home" --broker "$BROKER" \
    --out "dagster/tests/fixtures/versions/$v"
  psql -h 127.0.0.1 -U postgres -d postgres -q -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  rm -rf "$home"
}
while read -r v venv; do capture "$v" "$venv"; done < <(bash scripts/dagster-versions.sh)
capture 1.13.27 "$(bash scripts/python-peers.sh)"
