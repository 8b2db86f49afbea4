"""Runs a job of jobs.py with celery_k8s_job_executor, as a user would, and reports the outcome.

usage: run_job.py --home <dir> --job <name> [--timeout S]
Prints one JSON line: {run_id, status, step_events[{step_key, event_type, timestamp}], engine_messages,
failure_messages}. Everything else goes to stderr.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import settings  # noqa: E402

STEP_TYPES = {"STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED", "STEP_UP_FOR_RETRY", "STEP_RESTARTED"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--timeout", type=float, default=300)
    a = p.parse_args()
    home = os.path.abspath(a.home)
    env = dict(os.environ, DAGSTER_HOME=home)
    env.setdefault("DAGSTER_PG_PASSWORD", "unused")
    settings.save(home)

    cmd = [os.path.join(os.path.dirname(sys.executable), "dagster"), "job", "execute",
           "-f", os.path.join(HERE, "jobs.py"), "-j", a.job, "-c", os.path.join(home, "run_config.yaml")]
    try:
        subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, timeout=a.timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"run_job.py: {a.job} did not finish within {a.timeout} s", file=sys.stderr)

    os.environ["DAGSTER_HOME"] = home
    from dagster import DagsterInstance, RunsFilter

    instance = DagsterInstance.get()
    runs = instance.get_runs(filters=RunsFilter(job_name=a.job), limit=1)
    if not runs:
        print(json.dumps({"run_id": None, "status": "NOT_FOUND", "step_events": [], "engine_messages": [],
                          "failure_messages": []}))
        return
    run = runs[0]
    step_events, engine, failures, engine_meta = [], [], [], []
    for entry in instance.all_logs(run.run_id):
        ev = entry.dagster_event
        if ev is None:
            continue
        kind = ev.event_type_value
        if kind in STEP_TYPES:
            step_events.append({"step_key": ev.step_key, "event_type": kind, "timestamp": entry.timestamp})
        if kind == "ENGINE_EVENT":
            engine.append(ev.message)
            data = ev.event_specific_data
            labels = list(getattr(data, "metadata", {}) or {})
            engine_meta.append({"message": ev.message, "labels": labels})
        if kind in ("STEP_FAILURE", "RUN_FAILURE"):
            data = ev.event_specific_data
            err = getattr(data, "error", None)
            if err is not None:
                failures.append(err.to_string())
            if ev.message:
                failures.append(ev.message)
            if entry.user_message:
                failures.append(entry.user_message)
    print(json.dumps({"run_id": run.run_id, "status": run.status.value, "step_events": step_events,
                      "engine_messages": engine, "failure_messages": failures,
                      "engine_events": engine_meta}))


if __name__ == "__main__":
    main()
