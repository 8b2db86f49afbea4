"""`CeleriacRunLauncher`: a `CeleryK8sRunLauncher` that hands celery-k8s runs to `celeriac coordinator`.

Instead of creating the run-worker Kubernetes Job `dagster-run-<run_id>` (whose `celery_k8s_job_executor`
would publish the step tasks), `launch_run` computes with Dagster's own code everything that executor would
compute, stores it as one JSON row in `celeriac_coordinator_runs` (run storage's Postgres database) and sends
`NOTIFY celeriac_coordinator, '<run_id>'`. Runs whose plan uses another executor keep the parent's path.

How each hand-off field is computed (paths under site-packages, dagster 1.13.27 / dagster-celery-k8s 0.29.27;
"exc_cfg" = `_get_validated_celery_k8s_executor_config(run.run_config)`, dagster_celery_k8s/launcher.py:360-384,
the same resolved executor config (schema defaults filled) the parent uses at launcher.py:167; "executor" =
a `CeleryK8sJobExecutor` built with the arguments of `celery_k8s_job_executor`, executor.py:110-134, so its
`__init__` (executor.py:137-180) applies Python's own defaults and checks):

HANDOFF_FIELDS = {
    "version": "1: format of this JSON",
    "run_id": "run.run_id",
    "job_name": "run.job_name",
    "instance_ref": "pack_value(instance.get_ref()): the ref the parent ships in ExecuteRunArgs "
                    "(launcher.py:208); the run worker's instance is built from it and its get_ref() returns it "
                    "unchanged (instance.py:710-712), so it is what ExecuteStepArgs.instance_ref carries (executor.py:212)",
    "job_origin": "pack_value(run.job_code_origin) (= LaunchRunContext.job_code_origin, launcher/base.py:22); the run "
                  "worker rebuilds it via recon_job_from_origin (_cli/api.py:175) and get_python_origin() "
                  "(reconstruct.py:148-155, 310-311) returns the same fields (executable_path is always set by code servers)",
    "job_config_dict": "executor.job_config.to_dict() = launcher.get_k8s_job_config(job_image=exc_cfg job_image or "
                       "DAGSTER_CURRENT_IMAGE of the run-worker pod, exc_cfg) (executor.py:110-112, launcher.py:267-281). "
                       "DAGSTER_CURRENT_IMAGE is NOT set by construct_dagster_k8s_job (dagster_k8s/job.py:865-919); "
                       "we take it from the run-worker Job body the parent would create (env set via the run's "
                       "dagster-k8s/config tag), else None: then each step uses job_origin.repository_origin."
                       "container_image (executor.py:219-221) - done by the coordinator per step",
    "job_namespace": "exc_cfg.get('job_namespace', launcher.job_namespace) (executor.py:128)",
    "per_step_k8s_config": "exc_cfg.get('per_step_k8s_config', {}) (executor.py:133); enum values as their value",
    "load_incluster_config": "exc_cfg.get('load_incluster_config') - executor schema default True (config.py)",
    "kubeconfig_file": "exc_cfg.get('kubeconfig_file') (executor.py:130)",
    "job_wait_timeout": "exc_cfg.get('job_wait_timeout') - schema default 86400.0 (executor.py:132)",
    "retry_mode": "(launcher.retries or RetryMode.from_config(exc_cfg['retries'])).name (executor.py:119); "
                  "launcher.retries defaults to ENABLED (launcher.py:120-121) so it always wins; steps get "
                  "retry_mode.for_inner_plan() (executor.py:213)",
    "task_default_queue": "make_app(executor.app_args()).conf.task_default_queue (core_execution_loop.py:42-44; "
                          "config_source may change it, dagster_celery/config.py DEFAULT_CONFIG)",
    "task_default_priority": "make_app(...).conf.task_default_priority - forced to 5 (make_app.py:54)",
    "broker": "executor.broker = launcher.broker or exc_cfg broker, default dagster_celery.defaults.broker_url "
              "(executor.py:115, 162); password replaced by ***",
    "backend": "executor.backend = launcher.backend or exc_cfg backend (schema default rpc://) (executor.py:116, 163); "
               "password replaced by ***",
    "executor_name": "instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id).executor_name",
    "run_worker_image": "containers[0].image of the run-worker Job the parent would create (launcher.py:169-236); "
                        "also written to the dagster/image run tag, as the parent does; informational",
    "launched_at": "time.time() in the launcher process",
    "launcher_version": "dagster_celeriac.__version__",
    "dagster_version": "dagster.__version__",
}
"""

import json
import re
import time
from enum import Enum
from typing import TYPE_CHECKING, Any, Optional, cast

import dagster._check as check
from dagster import DagsterInvariantViolationError, Field
from dagster._core.events import EngineEventData
from dagster._core.execution.retries import RetryMode
from dagster._core.launcher import LaunchRunContext
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import DOCKER_IMAGE_TAG
from dagster._serdes import pack_value
from dagster._utils.merger import merge_dicts
from dagster.version import __version__ as dagster_version
from dagster_celery.make_app import make_app
from dagster_celery_k8s.config import CELERY_K8S_CONFIG_KEY
from dagster_celery_k8s.executor import CeleryK8sJobExecutor
from dagster_celery_k8s.launcher import CeleryK8sRunLauncher, _get_validated_celery_k8s_executor_config
from dagster_k8s.job import construct_dagster_k8s_job, get_job_name_from_run_id, get_user_defined_k8s_config
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from dagster_celeriac.version import __version__

if TYPE_CHECKING:
    from dagster._core.origin import JobPythonOrigin

HANDOFF_TABLE = "celeriac_coordinator_runs"
NOTIFY_CHANNEL = "celeriac_coordinator"
HANDOFF_VERSION = 1

_DDL = f"""CREATE TABLE IF NOT EXISTS {HANDOFF_TABLE} (
  run_id      text PRIMARY KEY,
  handoff     json NOT NULL,
  created_at  double precision NOT NULL,
  owner       text,
  heartbeat   double precision,
  state       text NOT NULL DEFAULT 'pending',
  finished_at double precision,
  error       text
)"""
# created_at and the ages used by check_run_worker_health come from the database clock, so that a coordinator
# that writes `heartbeat = EXTRACT(EPOCH FROM clock_timestamp())` is compared without any clock skew.
_DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
_INSERT = text(
    f"INSERT INTO {HANDOFF_TABLE} (run_id, handoff, created_at) VALUES (:run_id, CAST(:handoff AS json), {_DB_NOW}) "
    "ON CONFLICT (run_id) DO NOTHING"
)
_NOTIFY = text("SELECT pg_notify(:channel, :run_id)")
_SELECT = text(
    f"SELECT state, owner, created_at, heartbeat, error, {_DB_NOW} AS now FROM {HANDOFF_TABLE} WHERE run_id = :run_id"
)
_SECRET_QUERY = re.compile(r"([?&;](?:password|passwd|pass)=)[^&#;]*", re.IGNORECASE)


def redact_url(url: Optional[str]) -> Optional[str]:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...` (each `;`-separated failover URL; also
    `password=` query parameters). Unlike kombu's maybe_sanitize_url it changes nothing else (rpc:// stays)."""
    if not url:
        return url
    out = []
    for part in url.split(";"):
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*)(.*)$", part, re.DOTALL)
        if m:
            scheme, netloc, rest = m.groups()
            if "@" in netloc:
                userinfo, host = netloc.rsplit("@", 1)
                if ":" in userinfo:
                    userinfo = userinfo.split(":", 1)[0] + ":***"
                netloc = f"{userinfo}@{host}"
            part = scheme + netloc + rest
        out.append(_SECRET_QUERY.sub(r"\1***", part))
    return ";".join(out)


def _json_default(value: Any) -> Any:
    if isinstance(value, Enum):  # e.g. per_step_k8s_config merge_behavior (a DagsterEnum in the schema)
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class CeleriacRunLauncher(CeleryK8sRunLauncher):
    """CeleryK8sRunLauncher whose celery-k8s runs are driven by the celeriac run coordinator (no run-worker pod).

    dagster.yaml: `run_launcher: {module: dagster_celeriac, class: CeleriacRunLauncher, config: {...}}` with the
    CeleryK8sRunLauncher fields plus `coordinator_heartbeat_timeout` (s, default 60) and `handoff_executors`
    (executor names handed to the coordinator, default ["celery-k8s"]).
    """

    def __init__(self, coordinator_heartbeat_timeout=60.0, handoff_executors=None, **kwargs):
        self.coordinator_heartbeat_timeout = float(
            check.numeric_param(coordinator_heartbeat_timeout, "coordinator_heartbeat_timeout")
        )
        self.handoff_executors = list(
            check.opt_list_param(handoff_executors, "handoff_executors", of_type=str)
            if handoff_executors is not None
            else [CELERY_K8S_CONFIG_KEY]
        )
        self._handoff_table_ready = False
        super().__init__(**kwargs)

    @classmethod
    def config_type(cls):
        return merge_dicts(
            super().config_type(),
            {
                "coordinator_heartbeat_timeout": Field(
                    float,
                    is_required=False,
                    default_value=60.0,
                    description="Seconds without a lease renewal (or, for an unclaimed run, since the hand-off) "
                    "after which check_run_worker_health reports a handed-off run as FAILED.",
                ),
                "handoff_executors": Field(
                    [str],
                    is_required=False,
                    default_value=[CELERY_K8S_CONFIG_KEY],
                    description="Runs whose execution plan uses one of these executors are handed to the celeriac "
                    "coordinator; other runs get a CeleryK8sRunLauncher run-worker Job.",
                ),
            },
        )

    # ---------------------------------------------------------------------------------------------------- launch
    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        snapshot = (
            self._instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
            if run.execution_plan_snapshot_id
            else None
        )
        executor_name = snapshot.executor_name if snapshot else None
        if executor_name not in self.handoff_executors:
            return super().launch_run(context)

        handoff, image = self.compute_handoff(run, context.job_code_origin, executor_name)
        # Set docker/image tag as the parent does (launcher.py:232-236).
        self._instance.add_run_tags(run.run_id, {DOCKER_IMAGE_TAG: image})
        payload = json.dumps(handoff, default=_json_default)
        with self._connect() as conn:
            conn.execution_options(isolation_level="READ COMMITTED")  # the engine is AUTOCOMMIT
            with conn.begin():
                if not self._handoff_table_ready:
                    # serialize concurrent CREATE TABLE IF NOT EXISTS (it can race on pg_type otherwise)
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": HANDOFF_TABLE})
                    conn.execute(text(_DDL))
                conn.execute(_INSERT, {"run_id": run.run_id, "handoff": payload})
                conn.execute(_NOTIFY, {"channel": NOTIFY_CHANNEL, "run_id": run.run_id})
        self._handoff_table_ready = True

        self._instance.report_engine_event(
            "Handed run to the celeriac coordinator",
            run,
            EngineEventData({"Run ID": run.run_id, "Hand-off table": HANDOFF_TABLE}),
            cls=self.__class__,
        )

    def compute_handoff(self, run: DagsterRun, job_code_origin, executor_name: str):
        """The hand-off of `run`: everything its run worker's celery_k8s_job_executor would compute, computed
        with that executor's own code (see HANDOFF_FIELDS), and the run-worker image. Writes nothing but the
        parent's image-precedence engine event."""
        exc_config = _get_validated_celery_k8s_executor_config(run.run_config)
        run_worker_job = self._run_worker_job(run, job_code_origin, exc_config)
        container = run_worker_job.spec.template.spec.containers[0]

        # DAGSTER_CURRENT_IMAGE as seen by the run-worker pod (only knowable when set explicitly in its env).
        current_image = None
        for env in container.env or []:
            if env.name == "DAGSTER_CURRENT_IMAGE" and env.value:
                current_image = env.value
        executor = CeleryK8sJobExecutor(  # celery_k8s_job_executor, executor.py:110-134
            broker=self.broker or exc_config.get("broker"),
            backend=self.backend or exc_config.get("backend"),
            config_source=self.config_source or exc_config.get("config_source"),
            include=self.include or exc_config.get("include"),
            retries=self.retries or RetryMode.from_config(exc_config.get("retries")),
            job_config=self.get_k8s_job_config(
                job_image=exc_config.get("job_image") or current_image, exc_config=exc_config
            ),
            job_namespace=exc_config.get("job_namespace", self.job_namespace),
            load_incluster_config=exc_config.get("load_incluster_config"),
            kubeconfig_file=exc_config.get("kubeconfig_file"),
            repo_location_name=exc_config.get("repo_location_name"),
            job_wait_timeout=exc_config.get("job_wait_timeout"),
            per_step_k8s_config=exc_config.get("per_step_k8s_config", {}),
        )
        app = make_app(executor.app_args())  # core_execution_loop.py:42-44; no broker connection is made
        try:
            task_default_queue = app.conf.task_default_queue
            task_default_priority = app.conf.task_default_priority
        finally:
            app.close()

        handoff = {
            "version": HANDOFF_VERSION,
            "run_id": run.run_id,
            "job_name": run.job_name,
            "instance_ref": pack_value(self._instance.get_ref()),
            "job_origin": pack_value(job_code_origin),
            "job_config_dict": executor.job_config.to_dict(),
            "job_namespace": executor.job_namespace,
            "per_step_k8s_config": executor.per_step_k8s_config,
            "load_incluster_config": executor.load_incluster_config,
            "kubeconfig_file": executor.kubeconfig_file,
            "job_wait_timeout": executor.job_wait_timeout,
            "retry_mode": executor.retries.name,
            "task_default_queue": task_default_queue,
            "task_default_priority": task_default_priority,
            "broker": redact_url(executor.broker),
            "backend": redact_url(executor.backend),
            "executor_name": executor_name,
            "run_worker_image": container.image,
            "launched_at": time.time(),
            "launcher_version": __version__,
            "dagster_version": dagster_version,
        }
        return handoff, container.image

    def _run_worker_job(self, run: DagsterRun, job_code_origin, exc_config):
        """The run-worker Job body exactly as CeleryK8sRunLauncher.launch_run builds it (launcher.py:162-230),
        including its engine event when both the executor config and the code location name an image."""
        from dagster._cli.api import ExecuteRunArgs

        job_name = get_job_name_from_run_id(run.run_id)
        job_image_from_executor_config = exc_config.get("job_image")
        job_origin = cast("JobPythonOrigin", job_code_origin)
        job_image = job_origin.repository_origin.container_image
        if job_image:
            if job_image_from_executor_config:
                job_image = job_image_from_executor_config
                self._instance.report_engine_event(
                    f"You have specified a job_image {job_image_from_executor_config} in your"
                    f" executor configuration, but also {job_image} in your user-code"
                    f" deployment. Using the job image {job_image_from_executor_config} from"
                    " executor configuration as it takes precedence.",
                    run,
                    cls=self.__class__,
                )
        else:
            if not job_image_from_executor_config:
                raise DagsterInvariantViolationError(
                    "You have not specified a job_image in your executor configuration. To resolve"
                    " this error, specify the job_image configuration in the executor config"
                    " section in your run config. \nNote: You may also be seeing this error because"
                    " you are using the configured API. Using configured with the celery-k8s"
                    " executor is not supported at this time, and the job_image must be configured"
                    " at the top-level executor config without using configured."
                )
            job_image = job_image_from_executor_config

        labels = {"dagster/job": job_origin.job_name, "dagster/run-id": run.run_id}
        if run.remote_job_origin:
            labels["dagster/code-location"] = run.remote_job_origin.repository_origin.code_location_origin.location_name
        return construct_dagster_k8s_job(
            self.get_k8s_job_config(job_image, exc_config),
            args=ExecuteRunArgs(
                job_origin=job_origin,
                run_id=run.run_id,
                instance_ref=self._instance.get_ref(),
                set_exit_code_on_failure=self._fail_pod_on_run_failure,
            ).get_command_args(),
            job_name=job_name,
            pod_name=job_name,
            component="run_worker",
            user_defined_k8s_config=get_user_defined_k8s_config(run.tags),
            labels=labels,
            env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": job_origin.job_name}],
        )

    # ------------------------------------------------------------------------------------------------- database
    def _connect(self):
        storage = self._instance.run_storage
        if not hasattr(storage, "postgres_url"):
            raise DagsterInvariantViolationError(
                f"CeleriacRunLauncher needs a Postgres run storage (dagster_postgres); got {type(storage).__name__}"
            )
        return storage.connect()  # PostgresRunStorage's own SQLAlchemy engine (AUTOCOMMIT, NullPool)

    def _handoff_row(self, run_id: str):
        """(state, owner, created_at, heartbeat, error, db_now) of a handed-off run, None if it was not handed off."""
        if not hasattr(self._instance.run_storage, "postgres_url"):
            return None
        try:
            with self._connect() as conn:
                return conn.execute(_SELECT, {"run_id": run_id}).one_or_none()
        except ProgrammingError as e:
            if getattr(e.orig, "pgcode", None) == "42P01":  # undefined_table: nothing was ever handed off
                return None
            raise

    # -------------------------------------------------------------------------------------------- termination
    def terminate(self, run_id):
        check.str_param(run_id, "run_id")
        if self._handoff_row(run_id) is None:
            return super().terminate(run_id)
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        # The coordinator sees CANCELING (woken by the NOTIFY), revokes the step tasks and finishes the run;
        # workers delete the step Jobs. No Kubernetes call here.
        self._instance.report_run_canceling(run)
        with self._connect() as conn:
            conn.execute(_NOTIFY, {"channel": NOTIFY_CHANNEL, "run_id": run_id})
        return True

    # ----------------------------------------------------------------------------------------------- health
    @property
    def supports_check_run_worker_health(self):
        return True

    def check_run_worker_health(self, run: DagsterRun):
        row = self._handoff_row(run.run_id)  # a database error propagates: the daemon retries, never FAILED
        if row is None:
            return super().check_run_worker_health(run)
        state, owner, created_at, heartbeat, error, now = row
        if state == "finished":
            return CheckRunHealthResult(WorkerStatus.SUCCESS)
        if state == "failed":
            return CheckRunHealthResult(WorkerStatus.FAILED, error or "the celeriac coordinator failed this run")
        timeout = self.coordinator_heartbeat_timeout
        if state == "pending" or owner is None:
            age = now - max(created_at, heartbeat or 0.0)
            if age < timeout:
                return CheckRunHealthResult(WorkerStatus.RUNNING, "waiting for a coordinator")
            return CheckRunHealthResult(
                WorkerStatus.FAILED, f"no celeriac coordinator has claimed this run for {age:.0f} s (timeout {timeout:g} s)"
            )
        age = now - (heartbeat if heartbeat is not None else created_at)
        if age < timeout:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"celeriac coordinator {owner}")
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"celeriac coordinator {owner} has not renewed the lease of this run for {age:.0f} s (timeout {timeout:g} s)",
        )

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: Optional[bool] = True):
        row = self._handoff_row(run.run_id)
        if row is None:
            return super().get_run_worker_debug_info(run, include_container_logs)
        state, owner, created_at, heartbeat, error, now = row
        beat = f"{now - heartbeat:.0f} s ago" if heartbeat is not None else "never"
        return (
            f"celeriac coordinator hand-off ({HANDOFF_TABLE}): state={state} owner={owner} "
            f"handed off {now - created_at:.0f} s ago, last heartbeat {beat}" + (f", error: {error}" if error else "")
        )

    @property
    def supports_resume_run(self):
        return False
