"""Captures the version fixtures of one Dagster release (dagster/tests/fixtures/versions/<version>/), run with
that release's venv (scripts/dagster-versions.sh) by tests/tests/dagster_versions.rs when
CELERIAC_CAPTURE_FIXTURES=1:

  task_messages.json  the step tasks `celery_k8s_job_executor` publishes (headers, properties, body) for the
                      first step of `diamond` and of `diamond_sidecar` (an op with a dagster-k8s/config tag),
                      read with basic_get from a queue nobody consumes
  step_pod.log        the stdout of the step process of `diamond`'s first step (`dagster api execute_step`
                      with the published args, what the step pod logs)
  step_events.json    Dagster's own `filter_dagster_events_from_cli_logs` of that log
  job_bodies.json     `construct_dagster_k8s_job` for a few job/user configs, serialized by the Kubernetes
                      client ({"case", "job"})
  k8s_config.json     this release's DagsterK8sJobConfig fields and UserDefinedDagsterK8sConfig keys

usage: capture_version.py --home DIR --broker URL --out DIR
"""
import argparse
import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import settings  # noqa: E402

JOB_CASES = [
    ({}, {}),
    ({"dagster_home": "/opt/dagster/dagster_home", "postgres_password_secret": "dagster-postgresql-secret",
      "env_config_maps": ["cm1"], "env_secrets": ["s1"], "env_vars": ["A=1", "WITH_EQ=x=y"]}, {}),
    ({"resources": {"limits": {"cpu": "2"}}, "labels": {"team": "a"}},
     {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
      "job_metadata": {"labels": {"job-label": "j"}, "annotations": {"note": "n"}}}),
    ({"volumes": [{"name": "v", "secret": {"secret_name": "s"}}],
      "volume_mounts": [{"name": "v", "mount_path": "/v", "read_only": True}]},
     {"pod_spec_config": {"node_selector": {"disk_type": "ssd"},
                          "containers": [{"name": "sidecar", "image": "busybox", "args": ["sleep", "3600"]}]},
      "pod_template_spec_metadata": {"annotations": {"sidecar.istio.io/inject": "false"}}}),
    ({"security_context": {"run_as_user": 1000}, "image_pull_secrets": [{"name": "regcred"}],
      "service_account_name": "dagster-sa", "scheduler_name": "volcano"},
     {"container_config": {"security_context": {"run_as_non_root": True}, "imagePullPolicy": "Never"},
      "job_spec_config": {"active_deadline_seconds": 3600, "backoff_limit": 3}}),
]

BASE_JOB_CONFIG = {
    "job_image": "example.com/user-code:1.0", "dagster_home": None, "image_pull_policy": "IfNotPresent",
    "image_pull_secrets": [], "service_account_name": None, "instance_config_map": "dagster-instance",
    "postgres_password_secret": None, "env_config_maps": [], "env_secrets": [], "env_vars": [],
    "volume_mounts": [], "volumes": [], "labels": {}, "resources": {}, "scheduler_name": None,
    "security_context": {},
}


def job_bodies():
    import kubernetes
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job
    api = kubernetes.client.ApiClient()
    out = []
    for job_config, user_config in JOB_CASES:
        case = {
            "job_config": {**BASE_JOB_CONFIG, **job_config}, "user_config": user_config,
            "args": ["dagster", "api", "execute_step", "--compressed-input-json", "eJzLSM3JyQcABiwCFQ=="],
            "job_name": "dagster-step-2200769509be473b93badf403ceec29a",
            "pod_name": "dagster-step-2200769509be473b93badf403ceec29a", "component": "step_worker",
            "labels": {"dagster/job": "ck8s_job", "dagster/op": "add_one",
                       "dagster/run-id": "f93bb44e-0000-0000-0000-00000000754f"},
            "env_vars": [{"name": "DAGSTER_RUN_JOB_NAME", "value": "ck8s_job"}],
        }
        job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(**case["job_config"]), case["args"], case["job_name"],
            UserDefinedDagsterK8sConfig.from_dict(case["user_config"]), pod_name=case["pod_name"],
            component=case["component"], labels=case["labels"], env_vars=case["env_vars"])
        out.append({"case": case, "job": api.sanitize_for_serialization(job)})
    return out


def k8s_config():
    import inspect

    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig
    fields = [p for p in inspect.signature(DagsterK8sJobConfig.__new__).parameters if p != "cls"]
    return {"job_config_fields": sorted(fields),
            "user_defined_k8s_config_keys": sorted(UserDefinedDagsterK8sConfig().to_dict())}


def capture_task(home, broker, job, env):
    """Runs `job` with Python's run worker until its first step task waits in a queue nobody consumes."""
    from kombu import Connection
    queue = env["CELERIAC_QUEUE"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "dagster"), "job", "execute",
           "-f", os.path.join(HERE, "jobs.py"), "-j", job, "-c", os.path.join(home, "run_config.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Connection(broker) as conn:
            channel = conn.default_channel
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    msg = channel.basic_get(queue=queue, no_ack=True)
                except Exception:  # the queue is declared by the first publish
                    msg = None
                    conn.close()
                    conn = Connection(broker)
                    channel = conn.default_channel
                if msg is not None:
                    props = dict(msg.properties)
                    headers = props.pop("application_headers", {}) or {}
                    return {"job": job, "routing_key": msg.delivery_info.get("routing_key"),
                            "properties": {k: v for k, v in props.items() if isinstance(v, (str, int, float))},
                            "headers": json.loads(json.dumps(headers, default=str)),
                            "body": json.loads(msg.body)}
                time.sleep(0.3)
            raise SystemExit(f"no step task of {job} on {queue} within 120 s")
    finally:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    home = os.path.abspath(a.home)
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, DAGSTER_HOME=home)
    env.setdefault("DAGSTER_PG_PASSWORD", "unused")

    def write(name, value):
        with open(os.path.join(a.out, name), "w") as f:
            if isinstance(value, str):
                f.write(value)
            else:
                json.dump(value, f, indent=1, sort_keys=True)
                f.write("\n")

    write("k8s_config.json", k8s_config())
    write("job_bodies.json", job_bodies())

    tasks = []
    for job in ("diamond", "diamond_sidecar"):
        env["CELERIAC_QUEUE"] = f"capture_{uuid.uuid4().hex[:10]}"
        os.environ["CELERIAC_QUEUE"] = env["CELERIAC_QUEUE"]
        settings.save(home)
        tasks.append(capture_task(home, a.broker, job, env))
    write("task_messages.json", tasks)

    # The step process of diamond's first step, with the published args (what the step pod runs).
    from dagster._grpc.types import ExecuteStepArgs as Args
    from dagster._serdes import unpack_value
    from dagster._core.events.utils import filter_dagster_events_from_cli_logs
    kwargs = tasks[0]["body"][1]
    args = unpack_value(kwargs["execute_step_args_packed"], as_type=Args)
    cmd = args.get_command_args()
    step_env = dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    out = subprocess.run(cmd, env=step_env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise SystemExit(f"step process failed: {out.stderr[-2000:]}")
    write("step_pod.log", out.stdout)
    events = filter_dagster_events_from_cli_logs(out.stdout.split("\n"))
    from dagster._serdes import serialize_value
    write("step_events.json", {"event_types": [e.event_type_value for e in events],
                               "count": len(events),
                               "serialized": [serialize_value(e) for e in events]})
    print(json.dumps({"out": a.out, "tasks": len(tasks), "events": len(events)}))


if __name__ == "__main__":
    main()
