"""Extra code location of the coordinator home (make_coordinator_home.py): jobs that do NOT use celery-k8s.

`inprocess_hello` runs with Dagster's default executor, so CeleriacRunLauncher must not hand it off (it takes
CeleryK8sRunLauncher's own path and creates a run-worker Job).
"""
from dagster import Definitions, in_process_executor, job, op


@op
def say_hello():
    return "hello"


@job(executor_def=in_process_executor)
def inprocess_hello():
    say_hello()


defs = Definitions(jobs=[inprocess_hello])
