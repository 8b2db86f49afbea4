"""A Python Celery app for the flower-compat tests: the reference worker that runs next to celeriac
workers. Broker/backend come from FT_BROKER / FT_BACKEND.

    celery -A flower_tasks worker -Q <queue> -E
"""
import os
import time

from celery import Celery

app = Celery("flower_tasks", broker=os.environ["FT_BROKER"], backend=os.environ.get("FT_BACKEND", "rpc://"))
if app.conf.broker_url.startswith(("amqp", "pyamqp")):
    app.conf.task_queue_max_priority = 10  # as dagster_celery declares every queue
app.conf.worker_send_task_events = True


@app.task(name="flower_tasks.add")
def add(x, y):
    return x + y


@app.task(name="flower_tasks.fail")
def fail(msg):
    raise ValueError(msg)


@app.task(name="flower_tasks.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds
