"""Randomized traces through Dagster's real ActiveExecution, for the Rust run coordinator's differential test.

usage: plan_traces.py --db <postgres db> --out <file.jsonl> [--traces-per-shape N] [--seed S] [--shapes a,b,...]

For each shape of plan_shapes.py it creates ONE real run (NOT_STARTED) in a Postgres-backed instance, loads the
run's execution plan snapshot back from the `snapshots` table, and drives N fresh ActiveExecutions rebuilt from
it the way dagster_celery's core_celery_execution_loop does, with random interleavings, random step outcomes
(real DagsterEvents) and a virtual clock (dagster._core.execution.plan.active.time is replaced). A per-shape
summary goes to stderr; exits 1 if a shape never exercised its feature. Re-executes itself under PYTHONHASHSEED=0.

Output, one JSON object per line:
  {"kind": "shape", "shape", "run_id", "job_name", "retry_mode": "ENABLED"|"DEFERRED", "run_tags",
   "priority_formula", "snapshot_id"}                       (before the shape's traces)
  {"kind": "trace", "shape", "seed": seed*1000003 + trace_index, "calls": [CALL, ...]}
CALL = {"call", "now": virtual time, ...call fields, "state": STATE after the call}:
  start | get_steps_to_execute {"result": [keys]} | handle_event {"event": serialize_value(DagsterEvent)[, "error":
  "Class: message" (last call of the trace)]} | verify_complete {"step_key", "result": [logged errors]} |
  plan_events {"result": {"skipped": [{"step_key", "message"}], "abandoned": [{"step_key", "message",
  "failed_inputs": sorted, "abandoned_inputs": sorted}]}} | mark_interrupted
STATE = {"pending", "executable", "pending_skip", "pending_abandon" (list order), "waiting_to_retry": {key: at},
  "in_flight", "success", "failed", "skipped", "abandoned", "unknown" (sorted), "is_complete",
  "known_state": serialize_value(get_known_state())}
"""
import os
import sys

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time as real_time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MAX_CALLS = 500
RETRY_WAITS = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 0, 1.5]  # 0 counts as "no wait" in ActiveExecution
CLOCK_START = 1_700_000_000.0
TASK_DEFAULT_PRIORITY = 5  # dagster_celery.defaults.task_default_priority
PRIORITY_FORMULA = (
    "sort_key(step) = -1 * int(step.tags.get('dagster-celery/priority', 5)) + -1 * run_priority, where "
    "run_priority = int(run_tags['dagster-celery/run_priority']) if that tag is set and parses as int, else 0 "
    "(dagster_celery.core_execution_loop priority_for_step / _get_run_priority, task_default_priority 5); "
    "ActiveExecution sorts with Python's stable sorted(key=sort_key)"
)
# success: STEP_START/RESTARTED, outputs, STEP_SUCCESS; failure: some outputs, STEP_FAILURE; retry: some outputs,
# STEP_UP_FOR_RETRY; resource_init: RESOURCE_INIT_FAILURE, STEP_FAILURE (or UP_FOR_RETRY); unknown: STEP_START and
# maybe outputs, no terminal event; revoked: no events at all (celery task revoked after mark_interrupted);
# task_error: no events and, like core_celery_execution_loop's step_errors, no more get_steps_to_execute;
# duplicate_terminal: STEP_SUCCESS twice (the second raises); skipped_event: a STEP_SKIPPED event (raises).
OUTCOMES = ["success", "failure", "retry", "resource_init", "unknown", "revoked", "task_error",
            "duplicate_terminal", "skipped_event"]


def _make_db(db):
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()


def _write_home(home, db):
    import yaml

    pg = {"username": "postgres", "password": {"env": "DAGSTER_PG_PASSWORD"}, "hostname": "127.0.0.1",
          "db_name": db, "port": 5432}
    with open(os.path.join(home, "dagster.yaml"), "w") as f:
        yaml.safe_dump({"storage": {"postgres": {"postgres_db": pg}}, "telemetry": {"enabled": False}}, f)


# ---------------------------------------------------------------------------------------------------------
# Per-variant driver settings. Variants share their base shape's run; weights bias the outcome of each step.
DEFAULT_WEIGHTS = {"success": 74.0, "failure": 7.0, "retry": 6.0, "resource_init": 3.0, "unknown": 3.0,
                   "task_error": 0.4, "duplicate_terminal": 0.3, "skipped_event": 0.2}
DEFAULT_KNOBS = {
    "opt_emit": 0.5,  # P(success emits an optional non-dynamic output)
    "opt_dyn_empty": 0.25,  # P(success of an optional DynamicOut emits 0 keys)
    "check_emit": 0.85,  # P(success emits an asset-check output)
    "retry_no_wait": 0.4,  # P(STEP_UP_FOR_RETRY has seconds_to_wait None); else one of RETRY_WAITS
    "revoked": 0.6,  # P(a step completing after mark_interrupted was revoked: no events)
    "interrupt": 0.012,  # P(mark_interrupted) per tick
    "multi": 0.25,  # P(several in-flight steps complete in one tick)
    "idle": 0.12,  # P(a tick completes nothing)
}


class Variant:
    def __init__(self, name, shape, retry_mode="ENABLED", weights=None, focus=None, **knobs):
        self.name = name
        self.shape = shape
        self.retry_mode = retry_mode
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.focus = focus or {}  # step-key prefix -> weight overrides
        self.knobs = {**DEFAULT_KNOBS, **knobs}

    def weights_for(self, step_key):
        w = dict(self.weights)
        for prefix, over in self.focus.items():
            if step_key.startswith(prefix):
                w.update(over)
        return w


VARIANTS = [
    Variant("fan_in_optional", "fan_in_optional", weights={"failure": 9.0}, opt_emit=0.35),
    Variant("dynamic_collect", "dynamic_collect"),
    Variant("nested_dynamic", "nested_dynamic"),
    Variant("mapped_graph_dynamic", "mapped_graph_dynamic"),
    Variant("empty_dynamic", "empty_dynamic", opt_dyn_empty=0.6),
    Variant("retry_success", "retry_success", focus={"rs_flaky": {"retry": 45.0, "success": 50.0}}),
    Variant("retry_exhausted", "retry_exhausted", focus={"rx_doomed": {"retry": 45.0, "failure": 30.0}}),
    Variant("retry_exhausted_deferred", "retry_exhausted", retry_mode="DEFERRED",
            focus={"rx_doomed": {"retry": 45.0, "failure": 20.0}}),
    Variant("retry_requested", "retry_requested", focus={"rq_polite": {"retry": 45.0}}, retry_no_wait=0.15),
    Variant("fail_abandon", "fail_abandon", focus={"fa_boom": {"failure": 50.0, "unknown": 6.0}}),
    Variant("optional_skip", "optional_skip", opt_emit=0.3),
    Variant("priorities", "priorities", multi=0.45),
    Variant("op_subset", "op_subset"),
    Variant("step_subset", "step_subset"),
    Variant("reexecute_from_failure", "reexecute_from_failure"),
    Variant("asset_check", "asset_check", check_emit=0.5),
]


# ---------------------------------------------------------------------------------------------------------
class FakeClock:
    """Replaces the `time` module inside dagster._core.execution.plan.active."""

    def __init__(self):
        self.t = CLOCK_START

    def time(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


class _Log:
    def __init__(self, on_info=None, on_error=None):
        self._on_info = on_info
        self._on_error = on_error

    def info(self, msg, *a, **k):
        if self._on_info:
            self._on_info(msg)

    def error(self, msg, *a, **k):
        if self._on_error:
            self._on_error(msg)

    def warning(self, msg, *a, **k):
        pass

    warn = warning

    def debug(self, msg, *a, **k):
        pass

    def log_dagster_event(self, level, msg, dagster_event, batch_metadata=None):
        pass


class _StepContext:
    def __init__(self, job_context, step):
        self.step = step
        self.job_name = step.job_name
        self.event_tags = step.logging_tags
        self.log = _Log(on_info=lambda m: job_context.on_step_info(step, m),
                        on_error=lambda m: job_context.on_step_error(step, m))


class _JobContext:
    """Just enough of a PlanOrchestrationContext for verify_complete and plan_events_iterator."""

    def __init__(self, active):
        self.active = active
        self.errors = []
        self.skipped = []
        self.abandoned = []
        self.log = _Log(on_error=self.errors.append)

    def for_step(self, step):
        return _StepContext(self, step)

    def on_step_info(self, step, msg):
        self.skipped.append({"step_key": step.key, "message": msg})

    def on_step_error(self, step, msg):
        # called by plan_events_iterator just before mark_abandoned: recompute its lists, sorted
        failed, abandoned = [], []
        for step_input in step.step_inputs:
            failed.extend(self.active._failed.intersection(step_input.dependency_keys))
            abandoned.extend(self.active._abandoned.intersection(step_input.dependency_keys))
        self.abandoned.append({"step_key": step.key, "message": msg, "failed_inputs": sorted(failed),
                               "abandoned_inputs": sorted(abandoned)})


class _WarningCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------------------------------------
class EventFactory:
    def __init__(self, job_name):
        from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData, HandledOutputData
        from dagster._core.execution.plan.objects import (
            ErrorSource,
            StepFailureData,
            StepRetryData,
            StepSuccessData,
            TypeCheckData,
        )
        from dagster._core.execution.plan.outputs import StepOutputData, StepOutputHandle
        from dagster._utils.error import SerializableErrorInfo
        from dagster_shared.utils.timing import format_duration

        self.E, self.T = DagsterEvent, DagsterEventType
        self.EngineEventData, self.HandledOutputData = EngineEventData, HandledOutputData
        self.ErrorSource, self.StepFailureData, self.StepRetryData = ErrorSource, StepFailureData, StepRetryData
        self.StepSuccessData, self.TypeCheckData = StepSuccessData, TypeCheckData
        self.StepOutputData, self.StepOutputHandle = StepOutputData, StepOutputHandle
        self.SerializableErrorInfo, self.format_duration = SerializableErrorInfo, format_duration
        self.job_name = job_name

    def _ev(self, etype, step, data=None, message=None, step_scoped=True):
        if step_scoped:
            return self.E(event_type_value=etype.value, job_name=self.job_name, step_handle=step.handle,
                          node_handle=step.node_handle, step_kind_value="COMPUTE",
                          logging_tags=dict(step.logging_tags), event_specific_data=data, message=message)
        return self.E(event_type_value=etype.value, job_name=self.job_name, step_handle=step.handle,
                      event_specific_data=data, message=message)

    def _error(self, step, what):
        return self.SerializableErrorInfo(message=f"Exception: celeriac plan trace: {what} in {step.key}\n",
                                          stack=['  File "plan_shapes.py", line 1, in op\n'],
                                          cls_name="Exception", cause=None, context=None)

    def start(self, step, attempt):
        if attempt == 0:
            return self._ev(self.T.STEP_START, step, message=f'Started execution of step "{step.key}".')
        return self._ev(self.T.STEP_RESTARTED, step,
                        message=f'Started re-execution (attempt # {attempt + 1}) of step "{step.key}".')

    def output(self, step, output_name, mapping_key=None):
        handle = self.StepOutputHandle(step.key, output_name, mapping_key)
        mk = f' mapping key "{mapping_key}"' if mapping_key else ""
        return self._ev(self.T.STEP_OUTPUT, step,
                        self.StepOutputData(handle, type_check_data=self.TypeCheckData(success=True,
                                                                                       label=output_name)),
                        message=f'Yielded output "{output_name}"{mk} of type "Any". (Type check passed).')

    def handled_output(self, step, output_name):
        return self._ev(self.T.HANDLED_OUTPUT, step, self.HandledOutputData(output_name, "io_manager"),
                        message=f'Handled output "{output_name}" using IO manager "io_manager"')

    def success(self, step, duration_ms):
        return self._ev(self.T.STEP_SUCCESS, step, self.StepSuccessData(duration_ms=duration_ms),
                        message=f'Finished execution of step "{step.key}" in {self.format_duration(duration_ms)}.')

    def failure(self, step):
        return self._ev(self.T.STEP_FAILURE, step,
                        self.StepFailureData(error=self._error(step, "step failed"), user_failure_data=None,
                                             error_source=self.ErrorSource.USER_CODE_ERROR),
                        message=f'Execution of step "{step.key}" failed.')

    def retry(self, step, seconds):
        wait = f" in {seconds} seconds" if seconds else ""
        return self._ev(self.T.STEP_UP_FOR_RETRY, step,
                        self.StepRetryData(error=self._error(step, "retry requested"), seconds_to_wait=seconds),
                        message=f'Execution of step "{step.key}" failed and has requested a retry{wait}.')

    def resource_init_failure(self, step):
        return self._ev(self.T.RESOURCE_INIT_FAILURE, step,
                        self.EngineEventData(metadata={}, marker_end="resources",
                                             error=self._error(step, "resource init failed")),
                        message="Initialization of resources [io_manager] failed.", step_scoped=False)

    def skipped(self, step):
        return self._ev(self.T.STEP_SKIPPED, step, message=f'Skipped execution of step "{step.key}".')


# ---------------------------------------------------------------------------------------------------------
class TraceDriver:
    def __init__(self, variant, job_name, snapshot, run_tags, clock, warn_counter):
        from dagster._core.execution.plan.plan import ExecutionPlan
        from dagster._core.execution.retries import RetryMode
        from dagster_celery.core_execution_loop import _get_run_priority
        from dagster_celery.tags import DAGSTER_CELERY_STEP_PRIORITY_TAG
        from dagster_shared.serdes import serialize_value

        self.variant = variant
        self.job_name = job_name
        self.snapshot = snapshot
        self.clock = clock
        self.warn_counter = warn_counter
        self.ExecutionPlan = ExecutionPlan
        self.retry_mode = RetryMode[variant.retry_mode]
        self.serialize_value = serialize_value
        self.events = EventFactory(job_name)

        class _RunTagContext:  # what _get_run_priority reads from the job context
            def has_tag(self, key):
                return key in run_tags

            def get_tag(self, key):
                return run_tags.get(key)

        run_priority = _get_run_priority(_RunTagContext())

        def priority_for_step(step):
            return -1 * int(step.tags.get(DAGSTER_CELERY_STEP_PRIORITY_TAG, TASK_DEFAULT_PRIORITY)) + -1 * run_priority

        self.sort_key_fn = priority_for_step

    # -- recording
    def _state(self):
        a = self.active
        return {
            "pending": list(a._pending.keys()),
            "executable": list(a._executable),
            "pending_skip": list(a._pending_skip),
            "pending_abandon": list(a._pending_abandon),
            "waiting_to_retry": dict(a._waiting_to_retry),
            "in_flight": sorted(a._in_flight),
            "success": sorted(a._success),
            "failed": sorted(a._failed),
            "skipped": sorted(a._skipped),
            "abandoned": sorted(a._abandoned),
            "unknown": sorted(a._unknown_state),
            "is_complete": a.is_complete,
            "known_state": self.serialize_value(a.get_known_state()),
        }

    def _record(self, call, now, **fields):
        entry = {"call": call, "now": now, **fields, "state": self._state()}
        self.calls.append(entry)
        if self.active._waiting_to_retry:
            self.obs["waited_retry"] = True
        return entry

    # -- calls
    def call_start(self):
        now = self.clock.t
        self.active = self.plan.start(retry_mode=self.retry_mode, sort_key_fn=self.sort_key_fn)
        self.active.__enter__()  # sets the context guard; __exit__ is never called
        self._record("start", now)

    def call_get_steps_to_execute(self):
        now = self.clock.t
        steps = self.active.get_steps_to_execute()
        keys = [s.key for s in steps]
        self._record("get_steps_to_execute", now, result=keys)
        for k in keys:
            self.step_results[k] = None
            self.obs["vended"].append(k)
        if len(keys) > 1:
            self.obs["batches"].append(keys)
        return keys

    def call_handle_event(self, event):
        now = self.clock.t
        text = self.serialize_value(event)
        try:
            self.active.handle_event(event)
        except Exception as e:  # noqa: BLE001
            self._record("handle_event", now, event=text, error=f"{type(e).__name__}: {e}")
            self.obs["error"] = True
            return False
        self._record("handle_event", now, event=text)
        return True

    def call_verify_complete(self, step_key):
        now = self.clock.t
        ctx = _JobContext(self.active)
        self.active.verify_complete(ctx, step_key)
        self._record("verify_complete", now, step_key=step_key, result=list(ctx.errors))

    def call_plan_events(self):
        now = self.clock.t
        ctx = _JobContext(self.active)
        for _event in self.active.plan_events_iterator(ctx):
            pass
        self._record("plan_events", now, result={"skipped": ctx.skipped, "abandoned": ctx.abandoned})
        self.obs["skipped_entries"].extend(ctx.skipped)
        self.obs["abandoned_entries"].extend(ctx.abandoned)

    def call_mark_interrupted(self):
        now = self.clock.t
        self.active.mark_interrupted()
        self._record("mark_interrupted", now)

    # -- outcomes
    def _pick_outcome(self, step_key):
        w = self.variant.weights_for(step_key)
        if self.retry_mode.disabled:
            w["retry"] = 0.0
        kinds = [k for k in OUTCOMES if w.get(k, 0) > 0]
        return self.rng.choices(kinds, weights=[w[k] for k in kinds])[0]

    def _outputs(self, step, full):
        rng, knobs, ev = self.rng, self.variant.knobs, self.events
        out = []
        for so in step.step_outputs:
            if so.is_dynamic:
                if full:
                    if so.is_required:
                        n = rng.randint(1, 3)
                    else:
                        n = 0 if rng.random() < knobs["opt_dyn_empty"] else rng.randint(1, 3)
                else:
                    n = rng.choice([0, 0, 1, 2])
                for mk in rng.sample(["k0", "k1", "k2", "k3"], n):
                    out.append(ev.output(step, so.name, mk))
                    if rng.random() < 0.2:
                        out.append(ev.handled_output(step, so.name))
                continue
            if so.properties.asset_check_key is not None:
                emit = rng.random() < (knobs["check_emit"] if full else 0.3)
            elif full:
                emit = so.is_required or rng.random() < knobs["opt_emit"]
            else:
                emit = rng.random() < 0.3
            if emit:
                out.append(ev.output(step, so.name))
                if rng.random() < 0.2:
                    out.append(ev.handled_output(step, so.name))
        return out

    def _events_for(self, step, outcome):
        ev, rng = self.events, self.rng
        attempt = self.attempts[step.key]
        self.attempts[step.key] += 1
        if outcome == "resource_init":
            last = ev.failure(step)
            if not self.retry_mode.disabled and rng.random() < 0.25:
                last = ev.retry(step, None)
            return [ev.resource_init_failure(step), last]
        evs = [ev.start(step, attempt)]
        if outcome in ("success", "duplicate_terminal"):
            evs += self._outputs(step, full=True)
            done = ev.success(step, float(rng.randint(1, 5000)))
            evs.append(done)
            if outcome == "duplicate_terminal":
                evs.append(done)
        elif outcome == "failure":
            evs += self._outputs(step, full=False)
            evs.append(ev.failure(step))
        elif outcome == "retry":
            evs += self._outputs(step, full=False)
            seconds = None if rng.random() < self.variant.knobs["retry_no_wait"] else rng.choice(RETRY_WAITS)
            evs.append(ev.retry(step, seconds))
        elif outcome == "unknown":
            evs += self._outputs(step, full=False)
        elif outcome in ("revoked", "task_error"):
            return []
        elif outcome == "skipped_event":
            evs.append(ev.skipped(step))
        return evs

    def _advance(self, choices=(0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0)):
        self.clock.t += self.rng.choice(choices)

    # -- one trace
    def run(self, seed):
        self.rng = random.Random(seed)
        self.clock.t = CLOCK_START
        self.calls = []
        self.step_results = {}  # in-flight, in submission order (core_celery_execution_loop's step_results)
        self.attempts = defaultdict(int)
        self.outcomes = Counter()
        self.obs = {"vended": [], "batches": [], "skipped_entries": [], "abandoned_entries": [],
                    "waited_retry": False, "error": False, "interrupted": False, "truncated": False,
                    "stuck": False, "task_error": False, "warnings": []}
        self.warn_counter.messages = []
        # the plan is mutated by ActiveExecution (dynamic resolution): rebuild it for every trace
        self.plan = self.ExecutionPlan.rebuild_from_snapshot(self.job_name, self.snapshot)
        knobs = self.variant.knobs
        rng = self.rng

        self.call_start()
        self.call_get_steps_to_execute()
        while len(self.calls) < MAX_CALLS:
            interrupted = self.obs["interrupted"]
            no_scheduling = interrupted or self.obs["task_error"]
            if not self.step_results:
                if self.active.is_complete or no_scheduling:
                    break
                if self.active._waiting_to_retry:
                    earliest = min(self.active._waiting_to_retry.values())
                    if earliest > self.clock.t and rng.random() < 0.2:
                        self.clock.t = max(self.clock.t, earliest - rng.choice([0.25, 0.5]))
                    else:
                        self.clock.t = max(self.clock.t, earliest) + rng.choice([0.0, 0.0, 0.5, 1.0])
                    if rng.random() < 0.5:
                        self.call_plan_events()
                    self.call_get_steps_to_execute()
                    continue
                # nothing in flight, nothing waiting, not complete: the celery loop would spin forever
                self.obs["stuck"] = True
                break
            self._advance()
            if not interrupted and rng.random() < knobs["interrupt"]:
                self.call_mark_interrupted()
                self.obs["interrupted"] = interrupted = True
            elif rng.random() < knobs["idle"]:
                # a tick where no celery result is ready
                self._advance((0.5, 1.0, 2.0, 4.0))
                if rng.random() < 0.5:
                    self.call_plan_events()
                if not no_scheduling:
                    self.call_get_steps_to_execute()
                continue
            in_flight = list(self.step_results)
            n = 1
            if len(in_flight) > 1 and rng.random() < knobs["multi"]:
                n = rng.randint(2, min(3, len(in_flight)))
            ready = set(rng.sample(in_flight, n))
            # core_celery_execution_loop handles ready results sorted by priority (stable: submission order)
            ready_keys = sorted([k for k in in_flight if k in ready],
                                key=lambda k: self.sort_key_fn(self.active.get_step_by_key(k)))
            for key in ready_keys:
                step = self.active.get_step_by_key(key)
                if interrupted and rng.random() < knobs["revoked"]:
                    outcome = "revoked"
                else:
                    outcome = self._pick_outcome(key)
                if outcome == "task_error":
                    self.obs["task_error"] = no_scheduling = True
                self.outcomes[outcome] += 1
                for event in self._events_for(step, outcome):
                    if not self.call_handle_event(event):
                        return self._finish()
            for key in ready_keys:
                del self.step_results[key]
                self.call_verify_complete(key)
            self.call_plan_events()
            if not no_scheduling:
                if rng.random() < 0.3:
                    self._advance()
                self.call_get_steps_to_execute()
        else:
            self.obs["truncated"] = True
        return self._finish()

    def _finish(self):
        self.obs["warnings"] = list(self.warn_counter.messages)
        return self.calls


# ---------------------------------------------------------------------------------------------------------
# Feature checks: each shape must really exercise what it is for.
def _vended(obs, pattern):
    return any(re.fullmatch(pattern, k) for k in obs["vended"])


def _skipped(active, key):
    return key in active._skipped


def feature_checks(variant_name, active, obs, snapshot):
    f = {}
    a = active
    if variant_name == "fan_in_optional":
        f["fan_in_ran_with_missing_optional"] = (
            "fi_gather" in obs["vended"] and "fi_opt" in a._success
            and not any(h.step_key == "fi_opt" for h in a._step_outputs))
        f["fan_in_all_missing_skipped"] = _skipped(a, "fi_gather_opts")
    elif variant_name == "dynamic_collect":
        f["mapped_steps_ran"] = _vended(obs, r"dc_scale\[k\d\]")
        f["collect_ran"] = "dc_total" in obs["vended"]
    elif variant_name == "nested_dynamic":
        f["nested_b_resolved"] = _vended(obs, r"nd_b\[k\d\]")
        f["mapped_dynout_resolved"] = any(k.startswith("nd_fan[") for k in a._completed_dynamic_outputs)
        f["collect_ran"] = "nd_summary" in obs["vended"]
    elif variant_name == "mapped_graph_dynamic":
        f["inner_collect_skipped"] = _skipped(a, "mg_sub.mg_collect") and any(
            k.startswith("mg_sub.mg_fan[") for k in a._success)
    elif variant_name == "empty_dynamic":
        f["none_mapping_collect_skipped"] = (
            a._completed_dynamic_outputs.get("ed_maybe", {}).get("result", "x") is None
            and _skipped(a, "ed_total") and _skipped(a, "ed_after"))
    elif variant_name == "retry_success":
        f["retried_then_succeeded"] = obs["vended"].count("rs_flaky") >= 2 and "rs_flaky" in a._success
        f["waited_retry"] = obs["waited_retry"]
    elif variant_name == "retry_exhausted":
        f["abandoned_after_retries"] = (obs["vended"].count("rx_doomed") >= 2 and "rx_doomed" in a._failed
                                        and "rx_after" in a._abandoned)
    elif variant_name == "retry_exhausted_deferred":
        f["deferred_retry_abandons"] = (
            "rx_doomed" in a._abandoned and "rx_doomed" not in a._unknown_state
            and any(e["step_key"] == "rx_after" and e["abandoned_inputs"] == ["rx_doomed"]
                    for e in obs["abandoned_entries"]))
    elif variant_name == "retry_requested":
        f["waited_then_succeeded"] = obs["waited_retry"] and "rq_polite" in a._success
    elif variant_name == "fail_abandon":
        f["failed_and_not_executed_message"] = any(
            e["failed_inputs"] and e["abandoned_inputs"] for e in obs["abandoned_entries"])
        f["healthy_branch_ran"] = "fa_ok2" in a._success and "fa_boom" in a._failed
    elif variant_name == "optional_skip":
        f["skip_cascade"] = _skipped(a, "os_use_sometimes") and _skipped(a, "os_after_skip")
        f["required_sibling_ran"] = "os_use_always" in a._success and _skipped(a, "os_use_sometimes")
    elif variant_name == "priorities":
        f["priority_order"] = any(b.index("pr_hi") < b.index("pr_none") < b.index("pr_lo")
                                  for b in obs["batches"] if {"pr_hi", "pr_none", "pr_lo"} <= set(b))
    elif variant_name == "op_subset":
        f["subset_snapshot"] = (list(snapshot.step_keys_to_execute) == ["sb_left", "sb_bottom"]
                                and "sb_bottom" in obs["vended"])
    elif variant_name == "step_subset":
        f["step_keys_subset"] = (sorted(snapshot.step_keys_to_execute) == ["sb_bottom", "sb_left"]
                                 and len(snapshot.steps) == 4 and "sb_bottom" in obs["vended"])
    elif variant_name == "reexecute_from_failure":
        ks = a.get_known_state()
        f["parent_state"] = ks.parent_state is not None
        f["resolved_from_parent_mappings"] = "rf_work[k1]" in obs["vended"] and "rf_emit" not in obs["vended"]
    elif variant_name == "asset_check":
        f["check_missing_not_gating"] = any("will proceed without gating" in m for m in obs["warnings"]) and (
            "ac_clean" in obs["vended"] or "ac_clean2" in obs["vended"])
    return f


# ---------------------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--traces-per-shape", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--shapes", help="comma-separated variant names (default: all)")
    a = p.parse_args()
    t0 = real_time.time()

    warnings.filterwarnings("ignore")
    os.environ["DAGSTER_PG_PASSWORD"] = "unused"
    _make_db(a.db)
    home = tempfile.mkdtemp(prefix="celeriac-plan-traces-")
    _write_home(home, a.db)
    os.environ["DAGSTER_HOME"] = home

    import dagster._core.execution.plan.active as active_mod
    from dagster import DagsterInstance

    import plan_shapes

    variants = VARIANTS
    if a.shapes:
        wanted = [s.strip() for s in a.shapes.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {v.name for v in VARIANTS}]
        if unknown:
            p.error(f"unknown shapes: {unknown}; known: {[v.name for v in VARIANTS]}")
        variants = [v for v in VARIANTS if v.name in wanted]

    clock = FakeClock()
    active_mod.time = clock
    warn_counter = _WarningCounter()
    logging.getLogger(active_mod.__name__).addHandler(warn_counter)
    logging.getLogger(active_mod.__name__).propagate = False

    summaries = []
    failures = []
    try:
        with DagsterInstance.get() as instance, open(a.out, "w", encoding="utf-8") as out:
            runs = {}
            for v in variants:
                if v.shape not in runs:
                    spec = plan_shapes.SHAPES[v.shape]
                    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                        runs[v.shape] = plan_shapes.create_run(instance, spec)
                run = instance.get_run_by_id(runs[v.shape].run_id)
                snapshot = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
                out.write(json.dumps({
                    "kind": "shape", "shape": v.name, "run_id": run.run_id, "job_name": run.job_name,
                    "retry_mode": v.retry_mode, "run_tags": dict(run.tags), "priority_formula": PRIORITY_FORMULA,
                    "snapshot_id": run.execution_plan_snapshot_id,
                }, ensure_ascii=False) + "\n")

                driver = TraceDriver(v, run.job_name, snapshot, dict(run.tags), clock, warn_counter)
                stats = Counter()
                outcomes = Counter()
                features = Counter()
                for i in range(a.traces_per_shape):
                    seed = a.seed * 1000003 + i
                    calls = driver.run(seed)
                    out.write(json.dumps({"kind": "trace", "shape": v.name, "seed": seed, "calls": calls},
                                         ensure_ascii=False) + "\n")
                    obs, act = driver.obs, driver.active
                    outcomes.update(driver.outcomes)
                    stats["traces"] += 1
                    stats["calls"] += len(calls)
                    stats["complete"] += act.is_complete
                    stats["interrupted"] += obs["interrupted"]
                    stats["unknown"] += bool(act._unknown_state)
                    stats["skips"] += bool(act._skipped)
                    stats["abandons"] += bool(act._abandoned)
                    stats["retries_waited"] += obs["waited_retry"]
                    stats["errors"] += obs["error"]
                    stats["truncated"] += obs["truncated"]
                    stats["stuck"] += obs["stuck"]
                    stats["task_errors"] += obs["task_error"]
                    for name, hit in feature_checks(v.name, act, obs, snapshot).items():
                        features[name] += bool(hit)
                summaries.append((v, stats, outcomes, features))
                for name, count in features.items():
                    if count == 0:
                        failures.append(f"{v.name}: feature {name} never occurred")
    finally:
        shutil.rmtree(home, ignore_errors=True)

    total_outcomes = Counter()
    for v, stats, outcomes, features in summaries:
        total_outcomes.update(outcomes)
        print(f"{v.name:26s} [{v.retry_mode}] traces={stats['traces']} calls={stats['calls']} "
              f"complete={stats['complete']} interrupted={stats['interrupted']} unknown={stats['unknown']} "
              f"skips={stats['skips']} abandons={stats['abandons']} retries_waited={stats['retries_waited']} "
              f"task_errors={stats['task_errors']} errors={stats['errors']} truncated={stats['truncated']} "
              f"stuck={stats['stuck']}", file=sys.stderr)
        print(f"{'':26s} outcomes: " + " ".join(f"{k}={outcomes[k]}" for k in OUTCOMES), file=sys.stderr)
        print(f"{'':26s} features: " + " ".join(f"{k}={c}" for k, c in features.items()), file=sys.stderr)
    missing = [k for k in OUTCOMES if total_outcomes[k] == 0]
    if missing and a.traces_per_shape >= 50 and not a.shapes:
        failures.append(f"outcome kinds never used: {missing}")
    print("total outcomes: " + " ".join(f"{k}={total_outcomes[k]}" for k in OUTCOMES), file=sys.stderr)
    print(f"wrote {a.out} in {real_time.time() - t0:.1f} s", file=sys.stderr)
    for f in failures:
        print(f"WARNING: {f}", file=sys.stderr)
    if failures and a.traces_per_shape >= 50:
        sys.exit(1)


if __name__ == "__main__":
    main()
