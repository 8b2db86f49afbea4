"""Creates one run of a plan_shapes.py shape and drives it, then prints a summary for differential tests.

usage: run_shape.py --home <DAGSTER_HOME> --shape <name> --mode python|launch|create [--timeout S] [--no-wait]
       run_shape.py --home <DAGSTER_HOME> --shape - --mode summary|terminate --run-id <id>

  python  the run is executed by Python's own run worker: `dagster api execute_run <ExecuteRunArgs>`, exactly
          the command CeleryK8sRunLauncher's run-worker Job runs (celery_k8s_job_executor publishes the steps)
  launch  the run is launched through `instance.launch_run` (the run launcher of the home's dagster.yaml; with
          CeleriacRunLauncher the celeriac coordinator drives it) and waited for
  create  the run is only created (NOT_STARTED)
  summary the summary of an existing run; terminate: Dagster's termination (the run launcher's terminate())

With a CeleriacRunLauncher home, the output also carries the run's hand-off ("handoff") as the launcher computes
it (for message-parity tests).

The run config is the shape's op config plus the home's run_config.yaml (the celery-k8s executor config). The
run's job_code_origin is the shape job's Python origin, so the run worker reconstructs it as in production.
Prints one JSON line (last line of stdout); everything else goes to stderr.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
STEP_TYPES = {"STEP_START", "STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED", "STEP_UP_FOR_RETRY", "STEP_RESTARTED",
              "STEP_OUTPUT"}


def summarize(instance, run_id):
    """What a differential test compares: status, failure reason, per-step event type sequences (engine events
    normalized to their first words), mapping keys, step stats, run-level events."""
    from dagster._core.storage.tags import RUN_FAILURE_REASON_TAG

    run = instance.get_run_by_id(run_id)
    per_step, run_level, logs, outputs = {}, [], [], {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None:
            logs.append({"step_key": entry.step_key, "level": entry.level, "message": entry.user_message})
            continue
        kind = ev.event_type_value
        if ev.step_key:
            label = kind
            if kind == "ENGINE_EVENT":
                label = "ENGINE_EVENT:" + (ev.message or "")
            per_step.setdefault(ev.step_key, []).append(label)
            if kind == "STEP_OUTPUT":
                h = ev.event_specific_data.step_output_handle
                outputs.setdefault(ev.step_key, []).append([h.output_name, h.mapping_key])
        else:
            run_level.append({"type": kind, "message": ev.message})
    stats = {
        s.step_key: {"status": s.status.value if s.status else None, "attempts": s.attempts,
                     "markers": sorted(m.key for m in (s.markers or []))}
        for s in instance.get_run_step_stats(run_id)
    }
    return {"run_id": run_id, "status": run.status.value, "failure_reason": run.tags.get(RUN_FAILURE_REASON_TAG),
            "tags": dict(run.tags), "step_events": per_step, "run_events": run_level, "logs": logs,
            "outputs": outputs, "step_stats": stats}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--shape", required=True)
    p.add_argument("--mode", choices=["python", "launch", "create", "summary", "terminate"], required=True)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--no-wait", action="store_true", help="launch: print the run id as soon as it is launched")
    p.add_argument("--run-id", help="summary/terminate: the run")
    a = p.parse_args()
    home = os.path.abspath(a.home)
    os.environ["DAGSTER_HOME"] = home
    os.environ.setdefault("DAGSTER_PG_PASSWORD", "unused")

    import settings
    if a.mode not in ("summary", "terminate"):  # step processes of running runs read the saved settings
        settings.save(home)
    import yaml
    from dagster import DagsterInstance
    from dagster._cli.api import ExecuteRunArgs
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._serdes import serialize_value

    import plan_shapes

    if a.mode in ("summary", "terminate"):
        with DagsterInstance.get() as instance:
            if a.mode == "terminate":
                # Dagster's own termination path: the run launcher's terminate().
                print(json.dumps({"run_id": a.run_id, "terminated": instance.run_launcher.terminate(a.run_id)}))
            else:
                print(json.dumps(summarize(instance, a.run_id), default=str))
        return

    spec = plan_shapes.SHAPES[a.shape]
    with open(os.path.join(home, "run_config.yaml")) as f:
        executor_config = yaml.safe_load(f) or {}
    repo = ReconstructableRepository.for_file(os.path.join(HERE, "plan_shapes.py"), "defs", working_directory=HERE)
    origin = repo.get_reconstructable_job(spec.job.name).get_python_origin()

    with DagsterInstance.get() as instance:
        run = plan_shapes.create_run(instance, spec, executor_config, job_code_origin=origin)
        run_id = run.run_id
        print(f"run_shape.py: {a.shape} run {run_id} ({a.mode})", file=sys.stderr)
        handoff = None
        if hasattr(instance.run_launcher, "compute_handoff"):  # CeleriacRunLauncher homes
            snapshot = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
            handoff, _ = instance.run_launcher.compute_handoff(run, origin, snapshot.executor_name)
        if a.mode == "create":
            print(json.dumps({"run_id": run_id, "handoff": handoff}, default=str))
            return
        if a.mode == "python":
            args = ExecuteRunArgs(job_origin=origin, run_id=run_id, instance_ref=instance.get_ref())
            cmd = [os.path.join(os.path.dirname(sys.executable), "dagster"), "api", "execute_run",
                   serialize_value(args)]
            try:
                subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, timeout=a.timeout, check=False)
            except subprocess.TimeoutExpired:
                print(f"run_shape.py: the run worker did not finish within {a.timeout} s", file=sys.stderr)
        else:
            instance.launch_run(run_id, workspace=None)
            if a.no_wait:
                print(json.dumps({"run_id": run_id, "handoff": handoff}, default=str))
                return
            deadline = time.time() + a.timeout
            while time.time() < deadline:
                if instance.get_run_by_id(run_id).status.value in TERMINAL:
                    break
                time.sleep(0.5)
        print(json.dumps({**summarize(instance, run_id), "handoff": handoff}, default=str))


if __name__ == "__main__":
    main()
