"""Publishes N `execute_step_k8s_job` tasks of one STARTED run exactly as celery_k8s_job_executor
does (`_submit_task_k8s_job`: same kwargs, same routing), for the Kubernetes API-load test.

The steps' image is `celeriac/load-step:test`, which the process kubelet maps onto tests/peers/load-step
(its `dagster` sleeps LOAD_STEP_SECONDS and exits): the load is on Kubernetes and celeriac, not on
200 Python interpreters on a 2-core machine.

usage: publish_steps.py --home DIR --queue Q --count N --namespace NS --kubeconfig F
prints {"run_id": ..., "task_ids": [...]}
"""
import argparse
import json
import os
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--kubeconfig", required=True)
    a = p.parse_args()
    os.environ["DAGSTER_HOME"] = os.path.abspath(a.home)

    from celery import Celery
    from dagster import DagsterInstance
    from dagster._core.definitions.reconstruct import ReconstructableJob
    from dagster._core.execution.retries import RetryMode
    from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
    from dagster._grpc.types import ExecuteStepArgs
    from dagster._serdes import pack_value
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig

    instance = DagsterInstance.get()
    recon = ReconstructableJob.for_file(os.path.join(HERE, "jobs.py"), "sleepy")
    run_id = str(uuid.uuid4())
    instance.add_run(DagsterRun(job_name="sleepy", run_id=run_id, status=DagsterRunStatus.STARTED))
    launcher = instance.run_launcher
    job_config = launcher.get_k8s_job_config(job_image="celeriac/load-step:test", exc_config={})
    app = Celery("celeriac_load", broker=launcher.broker, backend=launcher.backend)
    # As dagster_celery.make_app configures it (queues declared with x-max-priority 10).
    app.conf.task_queue_max_priority = 10
    app.conf.task_default_priority = 5
    ids = []
    for i in range(a.count):
        args = ExecuteStepArgs(
            job_origin=recon.get_python_origin(), run_id=run_id, step_keys_to_execute=[f"load_{i}"],
            instance_ref=instance.get_ref(), retry_mode=RetryMode.DISABLED, known_state=None,
            should_verify_step=True, print_serialized_events=True,
        )
        kwargs = dict(
            execute_step_args_packed=pack_value(args), job_config_dict=job_config.to_dict(),
            job_namespace=a.namespace, user_defined_k8s_config_dict=UserDefinedDagsterK8sConfig().to_dict(),
            per_step_k8s_config={}, load_incluster_config=False, job_wait_timeout=600.0,
            kubeconfig_file=a.kubeconfig,
        )
        r = app.send_task("execute_step_k8s_job", kwargs=kwargs, queue=a.queue,
                          routing_key=f"{a.queue}.execute_step_k8s_job")
        ids.append(r.id)
    print(json.dumps({"run_id": run_id, "task_ids": ids}))


if __name__ == "__main__":
    sys.exit(main())
