"""Dagster jobs run through celeriac with `celery_k8s_job_executor` (see README.md in this folder)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dagster import Definitions, job, op  # noqa: E402
from dagster_celery_k8s import celery_k8s_job_executor  # noqa: E402

import settings  # noqa: E402

S = settings.load()
QUEUE = {"dagster-celery/queue": S["CELERIAC_QUEUE"]}
SLEEP = float(S["SLEEP_SECONDS"])


@op(tags=QUEUE)
def start():
    return 1


@op(tags=QUEUE)
def left(x):
    return x + 1


@op(tags=QUEUE)
def middle(x):
    return x * 10


@op(tags=QUEUE, name="middle")
def middle_exploding(x):
    raise Exception("celeriac test failure: middle exploded")


@op(tags=QUEUE)
def right(x):
    return x + 100


@op(tags=QUEUE)
def join(a, b, c):
    return a + b + c


@op(tags=QUEUE)
def finish(total):
    return total


@job(executor_def=celery_k8s_job_executor)
def diamond():
    s = start()
    finish(join(left(s), middle(s), right(s)))


@job(executor_def=celery_k8s_job_executor)
def diamond_failing():
    s = start()
    finish(join(left(s), middle_exploding(s), right(s)))


def _sleeper(name, queue):
    @op(name=name, tags={"dagster-celery/queue": queue})
    def _sleep():
        time.sleep(SLEEP)
        return name

    return _sleep


A_OPS = [_sleeper(f"a_{i}", S["CELERIAC_QUEUE_A"]) for i in range(8)]
B_OPS = [_sleeper(f"b_{i}", S["CELERIAC_QUEUE_B"]) for i in range(8)]


@job(executor_def=celery_k8s_job_executor)
def two_queues():
    for o in A_OPS + B_OPS:
        o()


@op(tags=QUEUE)
def sleepy_op():
    time.sleep(SLEEP)
    return SLEEP


@job(executor_def=celery_k8s_job_executor)
def sleepy():
    sleepy_op()


def _mark(context):
    """One line per execution of the op's body, in $DAGSTER_HOME/markers/<run_id>.<op> (the fault tests
    count them: each step body runs exactly once)."""
    folder = os.path.join(os.environ.get("DAGSTER_HOME", "."), "markers")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{context.run_id}.{context.op.name}"), "a") as f:
        f.write(f"{os.getpid()}\n")


@op(tags=QUEUE)
def marked_slow(context):
    _mark(context)
    time.sleep(SLEEP)
    return 1


@op(tags=QUEUE)
def marked_after(context, x):
    _mark(context)
    return x + 1


@job(executor_def=celery_k8s_job_executor)
def marked():
    marked_after(marked_slow())


@op(tags={**QUEUE, "dagster-k8s/config": {"container_config": {"env": [
    {"name": "AWS_SECRET_ACCESS_KEY", "value": S["CELERIAC_S3_KEY"]}]}}})
def read_s3_key(context):
    """Records that the step process got the AWS_SECRET_ACCESS_KEY of its k8s config tag (reversed: the secrets test
    searches every output for the key itself)."""
    folder = os.path.join(os.environ.get("DAGSTER_HOME", "."), "markers")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "s3_key_reversed"), "w") as f:
        f.write(os.environ.get("AWS_SECRET_ACCESS_KEY", "")[::-1])
    return 1


@job(executor_def=celery_k8s_job_executor)
def secret_env():
    read_s3_key()


# Kubernetes-only variants (the step's k8s config comes from the op's `dagster-k8s/config` tag).
STEP_IMAGE = "celeriac/dagster-step:test"
SIDECAR = {"dagster-k8s/config": {"pod_spec_config": {"containers": [{
    "name": "sidecar", "image": STEP_IMAGE,
    "command": ["sh", "-c", "echo sidecar says hello; echo '{\"sidecar\": true}'"],
}]}}}


@op(tags={**QUEUE, **SIDECAR}, name="start")
def start_with_sidecar():
    return 1


@job(executor_def=celery_k8s_job_executor)
def diamond_sidecar():
    s = start_with_sidecar()
    finish(join(left(s), middle(s), right(s)))


@op(tags={**QUEUE, "dagster-k8s/config": {"container_config": {"resources": {"limits": {"memory": "16Mi"}}}}})
def hungry():
    return len(bytearray(256 * 1024 * 1024))


@job(executor_def=celery_k8s_job_executor)
def oom():
    hungry()


@op(tags={**QUEUE, "dagster-k8s/config": {"container_config": {"image": "registry.invalid/celeriac/missing:1"}}})
def unpullable():
    return 1


@job(executor_def=celery_k8s_job_executor)
def bad_image():
    unpullable()


# The fleet timeline (flower-compat's run timeline test): a fan-out of four steps onto one queue (run with a
# worker limited to one step at a time, so they wait for each other), one of them failing its first attempt
# and retried, then a join.
from dagster import RetryPolicy  # noqa: E402


@op(tags=QUEUE)
def tl_start():
    return 1


def _tl_leaf(i):
    @op(name=f"tl_leaf_{i}", tags=QUEUE)
    def _leaf(x):
        time.sleep(0.5)
        return x + i

    return _leaf


TL_LEAVES = [_tl_leaf(i) for i in range(3)]


@op(tags=QUEUE, retry_policy=RetryPolicy(max_retries=1))
def tl_flaky(context, x):
    if context.retry_number == 0:
        raise Exception("celeriac test: tl_flaky fails its first attempt")
    return x


@op(tags=QUEUE)
def tl_join(a, b, c, d):
    return a + b + c + d


@job(executor_def=celery_k8s_job_executor)
def timeline():
    s = tl_start()
    tl_join(*[leaf(s) for leaf in TL_LEAVES], tl_flaky(s))


defs = Definitions(jobs=[diamond, diamond_failing, two_queues, sleepy, marked, secret_env, diamond_sidecar, oom,
                         bad_image, timeline])
