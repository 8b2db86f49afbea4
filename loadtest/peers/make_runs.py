"""Creates N runs (NOT_STARTED) of a load-test job in a Dagster home and prints, as JSON, their ids and the
hand-off CeleriacRunLauncher computes for the first one (the others differ only in their run id).

usage: make_runs.py --home DIR --job NAME --count N
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--count", type=int, required=True)
    a = p.parse_args()
    os.environ["DAGSTER_HOME"] = os.path.abspath(a.home)
    os.environ.setdefault("DAGSTER_PG_PASSWORD", "unused")
    sys.path.insert(0, HERE)
    import yaml
    from dagster import DagsterInstance
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.storage.dagster_run import DagsterRunStatus

    import bench_jobs

    job_def = getattr(bench_jobs, a.job)
    with open(os.path.join(a.home, "run_config.yaml")) as f:
        run_config = yaml.safe_load(f) or {}
    repo = ReconstructableRepository.for_file(os.path.join(HERE, "bench_jobs.py"), "defs", working_directory=HERE)
    origin = repo.get_reconstructable_job(job_def.name).get_python_origin()
    start = time.time()
    with DagsterInstance.get() as instance:
        plan = create_execution_plan(job_def, run_config)
        run_ids = []
        handoff = None
        for i in range(a.count):
            run = instance.create_run_for_job(job_def=job_def, execution_plan=plan, run_config=run_config,
                                              status=DagsterRunStatus.NOT_STARTED, job_code_origin=origin)
            run_ids.append(run.run_id)
            if handoff is None:
                snapshot = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
                handoff, _ = instance.run_launcher.compute_handoff(run, origin, snapshot.executor_name)
        print(f"make_runs.py: {a.count} runs in {time.time() - start:.1f} s", file=sys.stderr)
    print(json.dumps({"run_ids": run_ids, "handoff": handoff, "job_origin": None}, default=str))


if __name__ == "__main__":
    main()
