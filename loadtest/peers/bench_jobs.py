"""Jobs of the load test. Their steps never run user code: the workers' step program (celeriac-load-step,
installed as `dagster` on the workers' PATH) prints the events a real step would print, so the figures
measure the fleet (broker, workers, coordinator, Postgres, Kubernetes), not Python's import time."""
import os

from dagster import Definitions, In, Nothing, job, op
from dagster_celery_k8s import celery_k8s_job_executor

QUEUE = {"dagster-celery/queue": os.environ.get("LOAD_QUEUE", "celeriac_load")}


@op(tags=QUEUE)
def root():
    return 1


def _leaf(i):
    @op(name=f"leaf_{i}", tags=QUEUE)
    def _op(x):
        return x

    return _op


LEAVES = [_leaf(i) for i in range(8)]


@op(tags=QUEUE, ins={f"x{i}": In() for i in range(8)})
def join(**kwargs):
    return sum(kwargs.values())


@job(executor_def=celery_k8s_job_executor)
def ten_steps():
    """1 root → 8 leaves in parallel → 1 join: 10 steps, 3 waves."""
    r = root()
    join(**{f"x{i}": leaf(r) for i, leaf in enumerate(LEAVES)})


defs = Definitions(jobs=[ten_steps])
