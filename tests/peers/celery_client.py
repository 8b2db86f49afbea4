"""A real Celery client for the integration tests.

usage: celery_client.py --broker URL --backend URL <command> ...
  publish --queue Q --task NAME [--priority P] [--count N] [--kwargs JSON]   prints the task ids (JSON list)
          [--wait S]   then waits for them in this process (rpc:// replies come to the publisher) and prints
                       what `wait` prints
  bad --queue Q --kind KIND                                                  publishes a malformed message, prints its id
  wait --ids JSON [--timeout S]                                              prints [{id, state, result, date_done}]
  purge --queue Q
  revoke --id ID [--terminate]                                               broadcasts revoke

CELERIAC_TEST_BROKER_CA=<pem> sets broker_use_ssl (CA verification required) for an amqps:// broker.

Bad kinds (each really malformed on the wire, published with kombu so both brokers get kombu's layout):
  malformed-json   a v2 task whose body is not JSON
  pickle           content type application/x-python-serialize
  no-task-header   no `task` header and a body that is no v1 task
  unknown-task     a valid v2 task named no.such.task
  oversized        a valid execute_step_k8s_job task with a ~20 MiB argument
  bad-kwargs       a valid execute_step_k8s_job task without execute_step_args_packed
"""
import argparse
import json
import os
import pickle
import ssl
import sys
import uuid

from celery import Celery
from celery.result import AsyncResult
from kombu import Exchange, Queue


def app_for(broker, backend):
    app = Celery("celeriac_tests", broker=broker, backend=backend)
    if os.environ.get("CELERIAC_TEST_BROKER_CA"):
        # Celery's own TLS settings for amqps:// (rediss:// takes ssl_* in the URL's query instead).
        app.conf.broker_use_ssl = {"ca_certs": os.environ["CELERIAC_TEST_BROKER_CA"], "cert_reqs": ssl.CERT_REQUIRED}
    if broker.startswith(("amqp", "pyamqp")):
        app.conf.task_queue_max_priority = 10  # as dagster_celery declares every queue
    app.conf.task_default_priority = 5
    return app


def v2_headers(task, task_id):
    return {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None, "group": None,
        "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "()", "kwargsrepr": "{}", "origin": "celeriac-tests", "ignore_result": False,
    }


def publish_raw(app, queue, body, headers, content_type="application/json", encoding="utf-8", task_id=None):
    q = Queue(queue, Exchange(queue), routing_key=queue,
              queue_arguments={"x-max-priority": 10} if app.conf.task_queue_max_priority else None)
    with app.producer_or_acquire() as producer:
        producer.publish(
            body, exchange="", routing_key=queue, declare=[q], serializer=None, content_type=content_type,
            content_encoding=encoding, headers=headers, correlation_id=task_id, reply_to=app.thread_oid,
            priority=0, delivery_mode=2, retry=True,
        )


def bad(app, queue, kind):
    task_id = str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    if kind == "malformed-json":
        publish_raw(app, queue, b'[[], {"unterminated": ', v2_headers("celery.ping", task_id), task_id=task_id)
    elif kind == "pickle":
        publish_raw(app, queue, pickle.dumps(((), {}, embed)), v2_headers("celery.ping", task_id),
                    content_type="application/x-python-serialize", encoding="binary", task_id=task_id)
    elif kind == "no-task-header":
        publish_raw(app, queue, json.dumps({"hello": "world"}).encode(), {"id": task_id}, task_id=task_id)
    elif kind == "unknown-task":
        publish_raw(app, queue, json.dumps([[], {}, embed]).encode(), v2_headers("no.such.task", task_id), task_id=task_id)
    elif kind == "oversized":
        kwargs = {"execute_step_args_packed": {"blob": "x" * (20 * 1024 * 1024)}}
        publish_raw(app, queue, json.dumps([[], kwargs, embed]).encode(),
                    v2_headers("execute_step_k8s_job", task_id), task_id=task_id)
    elif kind == "bad-kwargs":
        kwargs = {"job_config_dict": {}, "job_namespace": "default", "load_incluster_config": False,
                  "job_wait_timeout": 60.0}
        publish_raw(app, queue, json.dumps([[], kwargs, embed]).encode(),
                    v2_headers("execute_step_k8s_job", task_id), task_id=task_id)
    else:
        raise SystemExit(f"unknown kind {kind}")
    print(task_id)


def wait(app, ids, timeout):
    out = []
    for task_id in ids:
        r = AsyncResult(task_id, app=app)
        try:
            r.get(timeout=timeout, propagate=False)
        except Exception as e:  # timeout: report the state as it is
            print(f"wait {task_id}: {e!r}", file=sys.stderr)
        result = r.result
        if isinstance(result, BaseException):
            result = f"{type(result).__name__}: {result}"
        out.append({"id": task_id, "state": r.state,
                    "result": result if isinstance(result, (str, int, float, list, dict, type(None))) else repr(result),
                    "date_done": r.date_done.isoformat() if r.date_done else None})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--backend", required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--queue", required=True)
    pub.add_argument("--task", required=True)
    pub.add_argument("--priority", type=int)
    pub.add_argument("--count", type=int, default=1)
    pub.add_argument("--kwargs", default="{}")
    pub.add_argument("--wait", type=float)
    b = sub.add_parser("bad")
    b.add_argument("--queue", required=True)
    b.add_argument("--kind", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--ids", required=True)
    w.add_argument("--timeout", type=float, default=60)
    rv = sub.add_parser("revoke")
    rv.add_argument("--id", required=True)
    rv.add_argument("--terminate", action="store_true")
    pu = sub.add_parser("purge")
    pu.add_argument("--queue", required=True)
    a = p.parse_args()
    app = app_for(a.broker, a.backend)

    if a.cmd == "publish":
        ids = [app.send_task(a.task, kwargs=json.loads(a.kwargs), queue=a.queue, priority=a.priority).id
               for _ in range(a.count)]
        print(json.dumps(wait(app, ids, a.wait) if a.wait else ids))
    elif a.cmd == "bad":
        bad(app, a.queue, a.kind)
    elif a.cmd == "wait":
        print(json.dumps(wait(app, json.loads(a.ids), a.timeout)))
    elif a.cmd == "revoke":
        app.control.revoke(a.id, terminate=a.terminate)
        print(json.dumps({"revoked": a.id}))
    elif a.cmd == "purge":
        with app.connection_for_write() as conn:
            print(conn.default_channel.queue_purge(a.queue) or 0)


if __name__ == "__main__":
    main()
