"""Checks dagster_celeriac.CeleriacRunLauncher end to end WITHOUT a coordinator (and without Kubernetes).

usage: coordinator_plugin_check.py --home <dir made by make_coordinator_home.py --heartbeat-timeout 3>
Needs `pip install -e coordinator/python`. Launches runs in this process through Dagster's own
`execute_launch_command` (workspace.yaml of the home), with every Kubernetes API call recorded and refused,
then plays the coordinator's part on the hand-off row by hand. Prints one JSON line
{"ok": bool, "checks": [{"name", "ok", "detail"}], "handoff": <hand-off of the first run>}; exit 1 if not ok.
"""
import argparse
import json
import os
import select
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = []


def check(name, ok, detail=None):
    CHECKS.append({"name": name, "ok": bool(ok), "detail": detail})
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--home", required=True)
    a = p.parse_args()
    # code servers (gRPC subprocesses) log to the inherited stdout: keep stdout for the JSON line only
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    home = os.path.abspath(a.home)
    os.environ["DAGSTER_HOME"] = home
    os.environ.setdefault("DAGSTER_PG_PASSWORD", "unused")
    os.environ.pop("DAGSTER_CURRENT_IMAGE", None)

    import kubernetes
    import psycopg2
    import yaml
    from dagster import DagsterInstance
    from dagster._cli.job import execute_launch_command
    from dagster._cli.workspace.cli_target import RepositoryOpts, WorkspaceOpts
    from dagster._core.launcher.base import WorkerStatus
    from dagster._core.utils import make_new_run_id

    k8s_calls = []

    def refuse(self, resource_path, method, *args, **kwargs):
        k8s_calls.append(f"{method} {resource_path}")
        raise RuntimeError(f"Kubernetes call refused by coordinator_plugin_check: {method} {resource_path}")

    kubernetes.client.ApiClient.call_api = refuse

    instance = DagsterInstance.get()
    launcher = instance.run_launcher
    check("launcher class", type(launcher).__name__ == "CeleriacRunLauncher", type(launcher).__name__)
    timeout = launcher.coordinator_heartbeat_timeout
    listen = psycopg2.connect(instance.run_storage.postgres_url)
    listen.autocommit = True
    listen.cursor().execute("LISTEN celeriac_coordinator")
    db = psycopg2.connect(instance.run_storage.postgres_url)
    db.autocommit = True

    def notifications(wait=2.0):
        deadline, got = time.time() + wait, []
        while time.time() < deadline:
            if select.select([listen], [], [], 0.2)[0]:
                listen.poll()
                while listen.notifies:
                    got.append(listen.notifies.pop(0).payload)
                if got:
                    break
        return got

    def launch(job, location, run_config, tags=None):
        run_id = make_new_run_id()
        cfg = os.path.join(home, f"run_config_{run_id}.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(run_config, f)
        err = None
        try:
            execute_launch_command(instance=instance, workspace_opts=WorkspaceOpts(workspace=[os.path.join(home, "workspace.yaml")]),
                                   repository_opts=RepositoryOpts(location=location), config=(cfg,),
                                   tags=json.dumps(tags) if tags else None, run_id=run_id, job_name=job)
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
        return run_id, err

    def row(run_id):
        with db.cursor() as cur:
            cur.execute("SELECT handoff, state, owner FROM celeriac_coordinator_runs WHERE run_id = %s", (run_id,))
            return cur.fetchone()

    with open(os.path.join(home, "run_config.yaml")) as f:
        base_config = yaml.safe_load(f)

    # 1. a celery-k8s job is handed off
    run_id, err = launch("dynamic_collect", "plan_shapes", base_config, {"dagster-celery/run_priority": "2"})
    launched = time.time()
    health = lambda rid: launcher.check_run_worker_health(instance.get_run_by_id(rid))  # noqa: E731
    h = health(run_id)
    check("health pending fresh → RUNNING (waiting for a coordinator)", h.status == WorkerStatus.RUNNING, h.msg)
    run = instance.get_run_by_id(run_id)
    check("handoff launch raised nothing", err is None, err)
    check("run is STARTING", run.status.value == "STARTING", run.status.value)
    check("NOTIFY celeriac_coordinator <run_id>", notifications() == [run_id])
    r = row(run_id)
    check("hand-off row exists, pending, unowned", r is not None and r[1] == "pending" and r[2] is None, r and r[1:])
    handoff = r[0] if r else {}
    keys = ["version", "run_id", "job_name", "instance_ref", "job_origin", "job_config_dict", "job_namespace",
            "per_step_k8s_config", "load_incluster_config", "kubeconfig_file", "job_wait_timeout", "retry_mode",
            "task_default_queue", "task_default_priority", "broker", "backend", "executor_name", "launched_at",
            "launcher_version", "dagster_version"]
    check("hand-off has every key", all(k in handoff for k in keys), sorted(set(keys) - set(handoff)))
    secrets = [s for s in ("s3cret", "r3dispw") if s in json.dumps({k: handoff.get(k) for k in ("broker", "backend")})]
    check("broker/backend redacted", not secrets and "***" in (handoff.get("broker") or "") + (handoff.get("backend") or ""),
          [handoff.get("broker"), handoff.get("backend")])
    check("dagster/image tag set", run.tags.get("dagster/image") == handoff.get("run_worker_image"), run.tags.get("dagster/image"))
    msgs = [e.dagster_event.message for e in instance.all_logs(run_id) if e.dagster_event]
    check("engine event reported", any("Handed run to the celeriac coordinator" in (m or "") for m in msgs), msgs)
    check("no Kubernetes call for the hand-off", not k8s_calls, k8s_calls)
    check("hand-off equals the run worker's own computation", *compare_with_run_worker(instance, run_id, handoff))

    # 2. a variant run config: config_source queue, per-step config with an enum, another namespace, k8s tag
    # The code servers inherit this process's env: DAGSTER_CURRENT_IMAGE becomes the repository origin's
    # container_image (dagster/_cli/code_server.py:231). The launcher itself must not read it.
    os.environ["DAGSTER_CURRENT_IMAGE"] = "celeriac/code-server:1"
    variant = json.loads(json.dumps(base_config))
    del variant["execution"]["config"]["job_image"]
    variant["execution"]["config"].update({
        "job_namespace": "celeriac-other", "config_source": {"task_default_queue": "celeriac_alt"},
        "retries": {"disabled": {}}, "image_pull_policy": "Always", "env_secrets": ["s1"],
        "per_step_k8s_config": {"dc_emit": {"container_config": {"resources": {"limits": {"cpu": "250m"}}},
                                            "merge_behavior": "SHALLOW"}}})
    tags = {"dagster-k8s/config": json.dumps({"container_config": {"image": "celeriac/run-worker:tag-override",
                                                                   "env": [{"name": "DAGSTER_CURRENT_IMAGE", "value": "celeriac/from-env:1"}]}})}
    run_id2, err = launch("dynamic_collect", "plan_shapes", variant, tags)
    notifications(0.5)
    h2 = (row(run_id2) or [{}])[0]
    check("variant launch raised nothing", err is None, err)
    check("variant: queue from config_source, SHALLOW as value, image from DAGSTER_CURRENT_IMAGE env",
          h2.get("task_default_queue") == "celeriac_alt" and h2.get("job_namespace") == "celeriac-other"
          and h2["per_step_k8s_config"]["dc_emit"]["merge_behavior"] == "SHALLOW"
          and h2["job_config_dict"]["job_image"] == "celeriac/from-env:1"
          and h2["job_config_dict"]["image_pull_policy"] == "Always"
          and h2["job_origin"]["repository_origin"]["container_image"] == "celeriac/code-server:1"
          and h2.get("run_worker_image") == "celeriac/run-worker:tag-override",
          {k: h2.get(k) for k in ("task_default_queue", "job_namespace", "run_worker_image", "per_step_k8s_config",
                                  "job_config_dict")})
    check("variant equals the run worker's own computation",
          *compare_with_run_worker(instance, run_id2, h2, current_image="celeriac/from-env:1"))

    run_id4, err = launch("dynamic_collect", "plan_shapes", {"execution": {"config": {
        k: v for k, v in base_config["execution"]["config"].items() if k != "job_image"}}})
    notifications(0.5)
    h4 = (row(run_id4) or [{}])[0]
    check("no job_image anywhere: job_config job_image None, origin carries the code-server image",
          err is None and h4["job_config_dict"]["job_image"] is None
          and h4["job_origin"]["repository_origin"]["container_image"] == "celeriac/code-server:1"
          and h4["run_worker_image"] == "celeriac/code-server:1", [err, h4.get("run_worker_image")])
    check("no job_image: equals the run worker's own computation", *compare_with_run_worker(instance, run_id4, h4))

    # 3. health: pending+fresh → RUNNING; claimed+fresh → RUNNING; stale lease → FAILED; finished/failed
    time.sleep(max(0.0, timeout + 1 - (time.time() - launched)))
    h = health(run_id)
    check("health pending after timeout → FAILED", h.status == WorkerStatus.FAILED, h.msg)
    now = "EXTRACT(EPOCH FROM clock_timestamp())"
    with db.cursor() as cur:
        cur.execute(f"UPDATE celeriac_coordinator_runs SET owner='replica-a', state='running', heartbeat={now} WHERE run_id=%s", (run_id,))
    h = health(run_id)
    check("health running, fresh heartbeat → RUNNING", h.status == WorkerStatus.RUNNING, h.msg)
    with db.cursor() as cur:
        cur.execute(f"UPDATE celeriac_coordinator_runs SET heartbeat={now} - %s WHERE run_id=%s", (timeout + 5, run_id))
    h = health(run_id)
    check("health running, stale heartbeat → FAILED naming the owner", h.status == WorkerStatus.FAILED and "replica-a" in h.msg, h.msg)
    check("debug info names the hand-off", "state=running" in (launcher.get_run_worker_debug_info(run) or ""),
          launcher.get_run_worker_debug_info(run))
    # relaunching the same run must not clobber the lease
    from dagster._core.launcher import LaunchRunContext
    launcher.launch_run(LaunchRunContext(dagster_run=instance.get_run_by_id(run_id), workspace=None))
    r = row(run_id)
    check("relaunch keeps the lease (ON CONFLICT DO NOTHING)", r[1] == "running" and r[2] == "replica-a", r[1:])
    notifications(0.5)

    # 4. terminate → CANCELING + NOTIFY, no Kubernetes call
    calls_before = len(k8s_calls)
    ok = launcher.terminate(run_id)
    check("terminate returns True, run CANCELING", ok and instance.get_run_by_id(run_id).status.value == "CANCELING",
          instance.get_run_by_id(run_id).status.value)
    check("terminate sends NOTIFY", notifications() == [run_id])
    check("terminate makes no Kubernetes call", len(k8s_calls) == calls_before, k8s_calls[calls_before:])
    with db.cursor() as cur:
        cur.execute(f"UPDATE celeriac_coordinator_runs SET state='finished', finished_at={now} WHERE run_id=%s", (run_id,))
        cur.execute("UPDATE celeriac_coordinator_runs SET state='failed', error='boom' WHERE run_id=%s", (run_id2,))
    check("health finished → SUCCESS", health(run_id).status == WorkerStatus.SUCCESS)
    h = health(run_id2)
    check("health failed → FAILED with the row's error", h.status == WorkerStatus.FAILED and h.msg == "boom", h.msg)
    instance.report_run_canceled(instance.get_run_by_id(run_id))
    check("terminate of a finished run → False", launcher.terminate(run_id) is False)

    # 5. a job with another executor takes CeleryK8sRunLauncher's own path (which tries Kubernetes here)
    calls_before = len(k8s_calls)
    run_id3, err = launch("inprocess_hello", "coordinator_extras", {})
    run3 = instance.get_run_by_id(run_id3)
    check("in-process job: parent path ran (created the run-worker Job)",
          any("jobs" in c and c.startswith("POST") for c in k8s_calls[calls_before:]), k8s_calls[calls_before:])
    check("in-process job: no hand-off row", row(run_id3) is None)
    check("in-process job: launch failed → run FAILURE", err is not None and run3.status.value == "FAILURE",
          [err and err[:200], run3.status.value])
    msgs = [e.dagster_event.message for e in instance.all_logs(run_id3) if e.dagster_event]
    check("in-process job: parent's 'Creating Kubernetes run worker job' event",
          any("Creating Kubernetes run worker job" in (m or "") for m in msgs), msgs)

    ok = all(c["ok"] for c in CHECKS)
    print(json.dumps({"ok": ok, "checks": CHECKS, "handoff": handoff}, default=str), file=json_out, flush=True)
    sys.exit(0 if ok else 1)


def compare_with_run_worker(instance, run_id, handoff, current_image=None):
    """Build the executor the way the run worker does (`dagster api execute_run`: recon job from the run's
    origin, instance from the ref, executor from the resolved run config) and compare."""
    from dagster import DagsterInstance
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.system_config.objects import ResolvedRunConfig
    from dagster._serdes import pack_value
    from dagster._utils.hosted_user_process import recon_job_from_origin
    from dagster_celeriac.launcher import _json_default, redact_url
    from dagster_celery.make_app import make_app

    run = instance.get_run_by_id(run_id)
    recon_job = recon_job_from_origin(run.job_code_origin)
    job_def = recon_job.get_definition()
    resolved = ResolvedRunConfig.build(job_def, run.run_config)
    worker_instance = DagsterInstance.from_ref(instance.get_ref())
    saved = os.environ.pop("DAGSTER_CURRENT_IMAGE", None)  # the run-worker pod's env, not ours
    if current_image:
        os.environ["DAGSTER_CURRENT_IMAGE"] = current_image
    try:
        executor = job_def.executor_def.executor_creation_fn(InitExecutorContext(
            job=recon_job, executor_def=job_def.executor_def,
            executor_config=resolved.execution.execution_engine_config, instance=worker_instance))
    finally:
        os.environ.pop("DAGSTER_CURRENT_IMAGE", None)
        if saved is not None:
            os.environ["DAGSTER_CURRENT_IMAGE"] = saved
    app = make_app(executor.app_args())
    expected = {
        "instance_ref": pack_value(worker_instance.get_ref()),
        "job_origin": pack_value(recon_job.get_python_origin()),
        "job_config_dict": executor.job_config.to_dict(),
        "job_namespace": executor.job_namespace,
        "per_step_k8s_config": executor.per_step_k8s_config,
        "load_incluster_config": executor.load_incluster_config,
        "kubeconfig_file": executor.kubeconfig_file,
        "job_wait_timeout": executor.job_wait_timeout,
        "retry_mode": executor.retries.name,
        "task_default_queue": app.conf.task_default_queue,
        "task_default_priority": app.conf.task_default_priority,
        "broker": redact_url(executor.broker),
        "backend": redact_url(executor.backend),
    }
    expected = json.loads(json.dumps(expected, default=_json_default))
    diff = {k: [v, handoff.get(k)] for k, v in expected.items() if handoff.get(k) != v}
    return not diff, diff or sorted(expected)


if __name__ == "__main__":
    main()
