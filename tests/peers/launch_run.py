"""Launches ONE run of a workspace job through Dagster's own launch path (what `dagster job launch` does).

usage: launch_run.py --home <DAGSTER_HOME> --workspace <workspace.yaml> --job <name> [--location <name>]
                     [--tags JSON] [--run-config YAML file] [--op-selection a,b] [--run-id ID]

Uses dagster._cli.job.execute_launch_command: loads the workspace (WorkspaceProcessContext, code servers as
gRPC subprocesses), creates the run with `_create_run` (job snapshot, execution plan snapshot, remote and
python origins stored exactly as Dagster stores them), then `instance.submit_run(run_id, workspace)`; the
default run coordinator calls `instance.launch_run` → the instance's run launcher `launch_run`.
Prints one JSON line {"run_id", "status"[, "error"]} (status read back from the instance); exit code 2 when
submit_run raised (the run is then FAILURE, as Dagster marks it).
"""
import argparse
import json
import os
import sys
import traceback


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--location")
    p.add_argument("--tags", help="JSON object of run tags")
    p.add_argument("--run-config", help="run config YAML file")
    p.add_argument("--op-selection", help="comma-separated op selection")
    p.add_argument("--run-id", help="run id to use (default: a new one)")
    a = p.parse_args()
    # code servers (gRPC subprocesses) log to the inherited stdout: keep stdout for the JSON line only
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ["DAGSTER_HOME"] = os.path.abspath(a.home)
    os.environ.setdefault("DAGSTER_PG_PASSWORD", "unused")

    from dagster import DagsterInstance
    from dagster._cli.job import execute_launch_command
    from dagster._cli.workspace.cli_target import RepositoryOpts, WorkspaceOpts
    from dagster._core.utils import make_new_run_id

    run_id = a.run_id or make_new_run_id()
    error = None
    with DagsterInstance.get() as instance:
        try:
            execute_launch_command(
                instance=instance,
                workspace_opts=WorkspaceOpts(workspace=[os.path.abspath(a.workspace)]),
                repository_opts=RepositoryOpts(location=a.location),
                config=(a.run_config,) if a.run_config else tuple(),
                tags=a.tags,
                run_id=run_id,
                op_selection=a.op_selection,
                job_name=a.job,
            )
        except Exception as e:  # noqa: BLE001 - reported in the JSON line
            traceback.print_exc(file=sys.stderr)
            error = f"{type(e).__name__}: {e}"
        run = instance.get_run_by_id(run_id)
        out = {"run_id": run_id if run else None, "status": run.status.value if run else "NOT_FOUND"}
    if error:
        out["error"] = error
    print(json.dumps(out), file=json_out, flush=True)
    sys.exit(2 if error else 0)


if __name__ == "__main__":
    main()
