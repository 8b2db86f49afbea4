"""Job shapes for the ActiveExecution differential test (see plan_traces.py and README.md).

Every job uses `celery_k8s_job_executor` and real, deterministic ops: run through celeriac's workers, each
shape produces the outcome named in its description (failures, retries, missing optional outputs, empty
dynamic outputs). Op behaviour that differs between a parent run and its re-execution is driven by op config.

`SHAPES = {name: ShapeSpec}`; `create_run(instance, spec, extra_run_config)` creates the shape's run
(NOT_STARTED) exactly as Dagster would for it, including the in-process parent run of re-execution shapes.
`python plan_shapes.py` builds every shape's execution plan and prints its steps.
"""
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dagster import (  # noqa: E402
    AssetCheckResult,
    AssetCheckSpec,
    Definitions,
    DynamicOut,
    DynamicOutput,
    Field,
    Out,
    Output,
    RetryPolicy,
    RetryRequested,
    asset,
    asset_check,
    define_asset_job,
    graph,
    job,
    op,
)
from dagster._core.definitions.job_definition import JobDefinition  # noqa: E402
from dagster._core.execution.api import create_execution_plan  # noqa: E402
from dagster._core.execution.plan.state import KnownExecutionState  # noqa: E402
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus  # noqa: E402
from dagster._core.storage.tags import (  # noqa: E402
    PARENT_RUN_ID_TAG,
    RESUME_RETRY_TAG,
    ROOT_RUN_ID_TAG,
    TAGS_TO_MAYBE_OMIT_ON_RETRY,
)
from dagster._core.selector.subset_selector import parse_step_selection  # noqa: E402
from dagster_celery_k8s import celery_k8s_job_executor  # noqa: E402

import settings  # noqa: E402

S = settings.load()
QUEUE = {"dagster-celery/queue": S["CELERIAC_QUEUE"]}
QUEUE_A = S["CELERIAC_QUEUE_A"]
QUEUE_B = S["CELERIAC_QUEUE_B"]
PRIORITY = "dagster-celery/priority"
RUN_PRIORITY = "dagster-celery/run_priority"


def _tags(**extra):
    return {**QUEUE, **extra}


# ---------------------------------------------------------------------------------------------------------
# 1. fan_in_optional: fan-out, then fan-in (FromMultipleSources) over sources one of which has an optional
#    output it does not emit (fi_gather runs with 2 of 3 values); fi_gather_opts fans in only optional
#    outputs, none emitted, so it is skipped.
@op(tags=QUEUE)
def fi_start():
    return 1


@op(tags=QUEUE)
def fi_a(x):
    return x + 1


@op(tags=QUEUE)
def fi_b(x):
    return x + 2


@op(tags=QUEUE, out=Out(int, is_required=False), config_schema={"emit": Field(bool, default_value=False)})
def fi_opt(context, x):
    if context.op_config["emit"]:
        yield Output(x + 3)


@op(tags=QUEUE, out=Out(int, is_required=False), config_schema={"emit": Field(bool, default_value=False)})
def fi_opt2(context, x):
    if context.op_config["emit"]:
        yield Output(x + 4)


@op(tags=QUEUE)
def fi_gather(xs):
    return sum(xs)


@op(tags=QUEUE)
def fi_gather_opts(xs):
    return sum(xs)


@op(tags=QUEUE)
def fi_report(total):
    return total


@job(executor_def=celery_k8s_job_executor)
def fan_in_optional():
    s = fi_start()
    opt = fi_opt(s)
    fi_report(fi_gather([fi_a(s), fi_b(s), opt]))
    fi_gather_opts([opt, fi_opt2(s)])


# ---------------------------------------------------------------------------------------------------------
# 2. dynamic_collect: DynamicOut -> .map (mapped op also takes a plain input) -> .collect() -> op -> op.
@op(tags=QUEUE, out=DynamicOut(int), config_schema={"count": Field(int, default_value=3)})
def dc_emit(context):
    for i in range(context.op_config["count"]):
        yield DynamicOutput(i, mapping_key=f"k{i}")


@op(tags=QUEUE)
def dc_factor():
    return 10


@op(tags=QUEUE)
def dc_scale(x, factor):
    return x * factor


@op(tags=QUEUE)
def dc_total(xs):
    return sum(xs)


@op(tags=QUEUE)
def dc_report(total):
    return total


@job(executor_def=celery_k8s_job_executor)
def dynamic_collect():
    f = dc_factor()
    dc_report(dc_total(dc_emit().map(lambda x: dc_scale(x, f)).collect()))


# ---------------------------------------------------------------------------------------------------------
# 3. nested_dynamic: emit().map(a).map(b).collect() -> summary, plus a mapped op that itself has a DynamicOut
#    (nd_fan[k*]; Dagster refuses anything mapped/collected downstream of it: "cannot be downstream of more
#    than one dynamic output"), so its dynamic output resolves to nothing.
@op(tags=QUEUE, out=DynamicOut(int), config_schema={"count": Field(int, default_value=2)})
def nd_emit(context):
    for i in range(context.op_config["count"]):
        yield DynamicOutput(i, mapping_key=f"k{i}")


@op(tags=QUEUE)
def nd_a(x):
    return x + 1


@op(tags=QUEUE)
def nd_b(x):
    return x * 2


@op(tags=QUEUE)
def nd_summary(xs):
    return sum(xs)


@op(tags=QUEUE, out=DynamicOut(int))
def nd_fan(x):
    for i in range(2):
        yield DynamicOutput(x + i, mapping_key=f"k{i}")


@job(executor_def=celery_k8s_job_executor)
def nested_dynamic():
    e = nd_emit()
    nd_summary(e.map(nd_a).map(nd_b).collect())
    e.map(nd_fan)


# 3b. mapped_graph_dynamic: a graph mapped over a DynamicOut whose body has its own DynamicOut + collect.
#     Dagster accepts it, but plans mg_sub.mg_collect as a collect resolved by mg_emit over the handles
#     `mg_sub.mg_fan[k].result` (no mapping key), which are never produced: the collect is always skipped.
@op(tags=QUEUE, out=DynamicOut(int))
def mg_emit():
    for i in range(2):
        yield DynamicOutput(i, mapping_key=f"k{i}")


@op(tags=QUEUE, out=DynamicOut(int))
def mg_fan(x):
    for i in range(2):
        yield DynamicOutput(x * 10 + i, mapping_key=f"j{i}")


@op(tags=QUEUE)
def mg_collect(xs):
    return sum(xs)


@graph
def mg_sub(x):
    return mg_collect(mg_fan(x).collect())


@job(executor_def=celery_k8s_job_executor)
def mapped_graph_dynamic():
    mg_emit().map(mg_sub)


# ---------------------------------------------------------------------------------------------------------
# 4. empty_dynamic: a non-required DynamicOut that yields nothing -> map -> collect -> op; the collect and
#    everything after it is skipped (mapping keys resolve to None), ed_side still runs.
@op(tags=QUEUE, out=DynamicOut(int, is_required=False), config_schema={"count": Field(int, default_value=0)})
def ed_maybe(context):
    for i in range(context.op_config["count"]):
        yield DynamicOutput(i, mapping_key=f"k{i}")


@op(tags=QUEUE)
def ed_work(x):
    return x + 1


@op(tags=QUEUE)
def ed_total(xs):
    return sum(xs)


@op(tags=QUEUE)
def ed_after(total):
    return total


@op(tags=QUEUE)
def ed_side():
    return 0


@job(executor_def=celery_k8s_job_executor)
def empty_dynamic():
    ed_after(ed_total(ed_maybe().map(ed_work).collect()))
    ed_side()


# ---------------------------------------------------------------------------------------------------------
# 5. retry_success: RetryPolicy(max_retries=3), fails on attempts 0 and 1, succeeds on attempt 2.
@op(tags=QUEUE)
def rs_start():
    return 1


@op(tags=QUEUE, retry_policy=RetryPolicy(max_retries=3))
def rs_flaky(context, x):
    if context.retry_number < 2:
        raise Exception(f"celeriac plan shape: rs_flaky fails on attempt {context.retry_number}")
    return x + context.retry_number


@op(tags=QUEUE)
def rs_after(x):
    return x


@job(executor_def=celery_k8s_job_executor)
def retry_success():
    rs_after(rs_flaky(rs_start()))


# ---------------------------------------------------------------------------------------------------------
# 6. retry_exhausted: RetryPolicy(max_retries=2), always fails; its downstream op is abandoned.
@op(tags=QUEUE)
def rx_start():
    return 1


@op(tags=QUEUE, retry_policy=RetryPolicy(max_retries=2))
def rx_doomed(context, x):
    raise Exception(f"celeriac plan shape: rx_doomed always fails (attempt {context.retry_number})")


@op(tags=QUEUE)
def rx_after(x):
    return x


@op(tags=QUEUE)
def rx_healthy(x):
    return x


@job(executor_def=celery_k8s_job_executor)
def retry_exhausted():
    s = rx_start()
    rx_after(rx_doomed(s))
    rx_healthy(s)


# ---------------------------------------------------------------------------------------------------------
# 7. retry_requested: RetryRequested(max_retries=1, seconds_to_wait=1) on the first attempt only.
@op(tags=QUEUE)
def rq_polite(context):
    if context.retry_number == 0:
        raise RetryRequested(max_retries=1, seconds_to_wait=1)
    return context.retry_number


@op(tags=QUEUE)
def rq_after(x):
    return x


@job(executor_def=celery_k8s_job_executor)
def retry_requested():
    rq_after(rq_polite())


# ---------------------------------------------------------------------------------------------------------
# 8. fail_abandon: fa_boom fails; fa_chain1 -> fa_chain2 and fa_mix(fa_boom, fa_chain1) are abandoned;
#    fa_ok1 -> fa_ok2 is a healthy branch.
@op(tags=QUEUE)
def fa_root():
    return 1


@op(tags=QUEUE)
def fa_boom(x):
    raise Exception("celeriac plan shape: fa_boom exploded")


@op(tags=QUEUE)
def fa_chain1(x):
    return x


@op(tags=QUEUE)
def fa_chain2(x):
    return x


@op(tags=QUEUE)
def fa_mix(a, b):
    return a + b


@op(tags=QUEUE)
def fa_ok1(x):
    return x + 1


@op(tags=QUEUE)
def fa_ok2(x):
    return x + 1


@job(executor_def=celery_k8s_job_executor)
def fail_abandon():
    r = fa_root()
    b = fa_boom(r)
    c1 = fa_chain1(b)
    fa_chain2(c1)
    fa_mix(b, c1)
    fa_ok2(fa_ok1(r))


# ---------------------------------------------------------------------------------------------------------
# 9. optional_skip: os_maybe yields its required output but not its optional one -> os_use_sometimes skipped
#    -> os_after_skip and os_both skipped (cascade); os_use_always runs.
@op(tags=QUEUE)
def os_start():
    return 1


@op(
    tags=QUEUE,
    out={"always": Out(int), "sometimes": Out(int, is_required=False)},
    config_schema={"emit_sometimes": Field(bool, default_value=False)},
)
def os_maybe(context, x):
    yield Output(x, "always")
    if context.op_config["emit_sometimes"]:
        yield Output(x + 1, "sometimes")


@op(tags=QUEUE)
def os_use_sometimes(x):
    return x


@op(tags=QUEUE)
def os_after_skip(x):
    return x


@op(tags=QUEUE)
def os_use_always(x):
    return x


@op(tags=QUEUE)
def os_both(a, b):
    return a + b


@job(executor_def=celery_k8s_job_executor)
def optional_skip():
    always, sometimes = os_maybe(os_start())
    used = os_use_sometimes(sometimes)
    os_after_skip(used)
    os_both(os_use_always(always), used)


# ---------------------------------------------------------------------------------------------------------
# 10. priorities: independent ops with dagster-celery/priority and dagster-celery/queue tags (two queues), a
#     dagster/priority-only op (ignored by the celery sort key), and downstream ops; run tag run_priority 3.
def _prio_op(name, queue, **tags):
    @op(name=name, tags={"dagster-celery/queue": queue, **tags})
    def _op():
        return name

    return _op


pr_hi = _prio_op("pr_hi", QUEUE_A, **{PRIORITY: "9"})
pr_mid = _prio_op("pr_mid", QUEUE_B, **{PRIORITY: "5"})
pr_lo = _prio_op("pr_lo", QUEUE_A, **{PRIORITY: "1"})
pr_neg = _prio_op("pr_neg", QUEUE_B, **{PRIORITY: "-3"})
pr_none = _prio_op("pr_none", QUEUE_A)
pr_dagster = _prio_op("pr_dagster", QUEUE_B, **{"dagster/priority": "10"})


@op(tags={"dagster-celery/queue": QUEUE_A, PRIORITY: "2"})
def pr_join(a, b):
    return f"{a}+{b}"


@op(tags={"dagster-celery/queue": QUEUE_B, PRIORITY: "7"})
def pr_tail(a, b):
    return f"{a}+{b}"


@job(executor_def=celery_k8s_job_executor, tags={RUN_PRIORITY: "3"})
def priorities():
    hi, lo = pr_hi(), pr_lo()
    pr_join(hi, lo)
    pr_tail(pr_mid(), pr_neg())
    pr_none()
    pr_dagster()


# ---------------------------------------------------------------------------------------------------------
# 11. op_subset / step_subset: a 4-op diamond. op_subset runs it with op_selection [sb_left, sb_bottom]
#     (Dagster subsets the job: the plan only has those steps, their unconnected inputs come from run config);
#     step_subset re-executes steps `sb_left*` of a successful parent run (full plan, step_keys_to_execute
#     is a subset, known_state has the parent's outputs).
@op(tags=QUEUE)
def sb_top():
    return 1


@op(tags=QUEUE)
def sb_left(x):
    return x + 1


@op(tags=QUEUE)
def sb_right(x):
    return x + 2


@op(tags=QUEUE)
def sb_bottom(l, r):  # noqa: E741
    return l * r


@job(executor_def=celery_k8s_job_executor)
def subset_diamond():
    t = sb_top()
    sb_bottom(sb_left(t), sb_right(t))


# ---------------------------------------------------------------------------------------------------------
# 12. reexecute_from_failure: the parent run (in-process, config fail=true / fail_key=k1) fails at rf_boom
#     and at the mapped step rf_work[k1]; the child (config: no failures) re-executes from failure.
@op(tags=QUEUE)
def rf_root():
    return 1


@op(tags=QUEUE, config_schema={"fail": Field(bool, default_value=False)})
def rf_boom(context, x):
    if context.op_config["fail"]:
        raise Exception("celeriac plan shape: rf_boom fails in the parent run")
    return x


@op(tags=QUEUE)
def rf_chain(x):
    return x


@op(tags=QUEUE)
def rf_ok(x):
    return x


@op(tags=QUEUE, out=Out(int, is_required=False))
def rf_never(x):
    if x < 0:
        yield Output(x)


@op(tags=QUEUE)
def rf_skipped(x):
    return x


@op(tags=QUEUE, out=DynamicOut(int))
def rf_emit():
    for i in range(3):
        yield DynamicOutput(i, mapping_key=f"k{i}")


@op(tags=QUEUE, config_schema={"fail_key": Field(str, default_value="")})
def rf_work(context, x):
    if context.op_config["fail_key"] == f"k{x}":
        raise Exception(f"celeriac plan shape: rf_work fails for k{x} in the parent run")
    return x


@op(tags=QUEUE)
def rf_total(xs):
    return sum(xs)


@job(executor_def=celery_k8s_job_executor)
def reexec_mixed():
    r = rf_root()
    rf_chain(rf_boom(r))
    rf_ok(r)
    rf_skipped(rf_never(r))
    rf_total(rf_emit().map(rf_work).collect())


REEXEC_PARENT_CONFIG = {"ops": {"rf_boom": {"config": {"fail": True}}, "rf_work": {"config": {"fail_key": "k1"}}}}


# ---------------------------------------------------------------------------------------------------------
# 13. asset_check: ac_raw with a separate blocking @asset_check (its own step, whose output carries an
#     asset_check_key) and ac_raw2 with an in-step blocking check spec (a second, check output on the asset
#     step); downstream assets take FromMultipleSourcesLoadSingleSource inputs over asset + check outputs.
@asset(op_tags=QUEUE)
def ac_raw():
    return 1


@asset_check(asset=ac_raw, blocking=True, op_tags=QUEUE)
def ac_raw_check(ac_raw):
    return AssetCheckResult(passed=ac_raw == 1)


@asset(op_tags=QUEUE)
def ac_clean(ac_raw):
    return ac_raw + 1


@asset(op_tags=QUEUE, check_specs=[AssetCheckSpec("ac_in_step", asset="ac_raw2", blocking=True)])
def ac_raw2():
    yield Output(2)
    yield AssetCheckResult(check_name="ac_in_step", passed=True)


@asset(op_tags=QUEUE)
def ac_clean2(ac_raw2, ac_clean):
    return ac_raw2 + ac_clean


_asset_check_job = define_asset_job("asset_check_job", executor_def=celery_k8s_job_executor)
_asset_defs = Definitions(assets=[ac_raw, ac_clean, ac_raw2, ac_clean2], asset_checks=[ac_raw_check],
                          jobs=[_asset_check_job])
asset_check_job: JobDefinition = _asset_defs.get_job_def("asset_check_job")


# ---------------------------------------------------------------------------------------------------------
# slow: a fan-out of two sleeping ops joined by a third (SLEEP_SECONDS each), for fault tests that act
# while steps run (termination, coordinator crashes, broker restarts).
@op(tags=QUEUE)
def sl_a():
    time.sleep(float(S["SLEEP_SECONDS"]))
    return 1


@op(tags=QUEUE)
def sl_b():
    time.sleep(float(S["SLEEP_SECONDS"]))
    return 2


@op(tags=QUEUE)
def sl_join(a, b):
    time.sleep(float(S["SLEEP_SECONDS"]))
    return a + b


@job(executor_def=celery_k8s_job_executor)
def slow():
    sl_join(sl_a(), sl_b())


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeSpec:
    name: str
    job: JobDefinition
    description: str
    # how the run is created: "plain", "op_selection", "reexecute_from_failure", "reexecute_steps"
    create: str = "plain"
    run_tags: dict = field(default_factory=dict)  # extra run tags (the job's own tags are added by Dagster)
    run_config: dict = field(default_factory=dict)  # op config; merge the executor config in for real runs
    op_selection: list | None = None
    parent_run_config: dict | None = None  # re-execution shapes: config of the in-process parent run
    step_selection: list | None = None  # reexecute_steps: the step selection query


SHAPES: dict[str, ShapeSpec] = {s.name: s for s in [
    ShapeSpec("fan_in_optional", fan_in_optional,
              "fan-in (FromMultipleSources) with a missing optional source; fan-in of only-missing sources skips"),
    ShapeSpec("dynamic_collect", dynamic_collect, "DynamicOut -> map (with a plain input) -> collect -> op"),
    ShapeSpec("nested_dynamic", nested_dynamic,
              "emit().map(a).map(b).collect(); mapped op with its own DynamicOut (nothing downstream)"),
    ShapeSpec("mapped_graph_dynamic", mapped_graph_dynamic,
              "graph with inner DynamicOut+collect mapped over a DynamicOut: the collect always skips"),
    ShapeSpec("empty_dynamic", empty_dynamic, "optional DynamicOut yielding nothing: map+collect skipped"),
    ShapeSpec("retry_success", retry_success, "RetryPolicy(3): fails twice then succeeds"),
    ShapeSpec("retry_exhausted", retry_exhausted, "RetryPolicy(2): always fails, downstream abandoned"),
    ShapeSpec("retry_requested", retry_requested, "RetryRequested(max_retries=1, seconds_to_wait=1) once"),
    ShapeSpec("fail_abandon", fail_abandon, "failure abandons a chain (failed + not-executed deps), healthy branch"),
    ShapeSpec("optional_skip", optional_skip, "missing optional output: skip cascade"),
    ShapeSpec("priorities", priorities, "celery step priorities, two queues, run priority 3",
              run_tags={RUN_PRIORITY: "3"}),
    ShapeSpec("op_subset", subset_diamond, "op_selection [sb_left, sb_bottom] of a diamond (subset job)",
              create="op_selection", op_selection=["sb_left", "sb_bottom"],
              run_config={"ops": {"sb_left": {"inputs": {"x": {"value": 1}}},
                                  "sb_bottom": {"inputs": {"r": {"value": 3}}}}}),
    ShapeSpec("step_subset", subset_diamond, "re-execution of steps sb_left* of a successful parent",
              create="reexecute_steps", parent_run_config={}, step_selection=["sb_left*"]),
    ShapeSpec("reexecute_from_failure", reexec_mixed,
              "re-execute from failure: failed op + failed mapped step of a dynamic output, skipped op",
              create="reexecute_from_failure", parent_run_config=REEXEC_PARENT_CONFIG),
    ShapeSpec("asset_check", asset_check_job, "blocking asset checks (own step and in-step), downstream assets"),
    ShapeSpec("slow", slow, "two sleeping ops joined by a third (fault tests)"),
]}


def _merge(a: dict, b: dict | None) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _run_parent_in_process(instance, spec: ShapeSpec) -> DagsterRun:
    # execute_in_process replaces the celery_k8s executor with the in-process one; the run (same job name)
    # and its events are stored in `instance`.
    result = spec.job.execute_in_process(run_config=spec.parent_run_config or {}, instance=instance,
                                         raise_on_error=False)
    run = instance.get_run_by_id(result.run_id)
    assert run is not None
    return run


def _reexecution_tags(spec: ShapeSpec, parent: DagsterRun) -> dict:
    # as DagsterInstance.create_reexecuted_run (the UI's "re-execute"): job tags, the parent's tags minus
    # TAGS_TO_MAYBE_OMIT_ON_RETRY, parent/root run ids.
    tags = dict(spec.job.tags)
    tags.update({k: v for k, v in parent.tags.items() if k not in TAGS_TO_MAYBE_OMIT_ON_RETRY})
    tags.update(spec.run_tags)
    tags[PARENT_RUN_ID_TAG] = parent.run_id
    tags[ROOT_RUN_ID_TAG] = parent.root_run_id or parent.run_id
    return tags


def create_run(instance, spec: ShapeSpec, extra_run_config: dict | None = None,
               job_code_origin=None) -> DagsterRun:
    """Creates the shape's run (NOT_STARTED) in `instance`; `extra_run_config` (e.g. the celery_k8s
    `execution` section) is merged into the run config of the run itself, not of in-process parents.
    `job_code_origin` (the job's Python origin) lets a run worker reconstruct the job from the run."""
    run_config = _merge(spec.run_config, extra_run_config)
    job_def = spec.job
    if spec.create == "plain":
        tags = {**job_def.tags, **spec.run_tags}
        plan = create_execution_plan(job_def, run_config, tags=tags)
        return instance.create_run_for_job(job_def=job_def, execution_plan=plan, run_config=run_config,
                                           tags=tags, status=DagsterRunStatus.NOT_STARTED,
                                           job_code_origin=job_code_origin)
    if spec.create == "op_selection":
        tags = {**job_def.tags, **spec.run_tags}
        sub = job_def.get_subset(op_selection=spec.op_selection)
        plan = create_execution_plan(sub, run_config, tags=tags)
        return instance.create_run_for_job(job_def=job_def, execution_plan=plan, run_config=run_config,
                                           tags=tags, status=DagsterRunStatus.NOT_STARTED,
                                           op_selection=list(spec.op_selection),
                                           resolved_op_selection=set(spec.op_selection),
                                           job_code_origin=job_code_origin)
    parent = _run_parent_in_process(instance, spec)
    tags = _reexecution_tags(spec, parent)
    if spec.create == "reexecute_from_failure":
        assert parent.status == DagsterRunStatus.FAILURE, parent.status
        step_keys, known_state = KnownExecutionState.build_resume_retry_reexecution(instance, parent)
        tags[RESUME_RETRY_TAG] = "true"
    elif spec.create == "reexecute_steps":
        assert parent.status == DagsterRunStatus.SUCCESS, parent.status
        # as dagster._core.execution.api._resolve_reexecute_step_selection
        state = KnownExecutionState.build_for_reexecution(instance, parent)
        parent_plan = create_execution_plan(job_def, parent.run_config, known_state=state)
        selected = parse_step_selection(parent_plan.get_all_step_deps(), spec.step_selection)
        step_keys = list(selected)
        known_state = state.update_for_step_selection(selected)
    else:
        raise ValueError(f"unknown run creation {spec.create!r}")
    plan = create_execution_plan(job_def, run_config, step_keys_to_execute=list(step_keys),
                                 known_state=known_state, tags=parent.tags)
    return instance.create_run_for_job(job_def=job_def, execution_plan=plan, run_config=run_config, tags=tags,
                                       status=DagsterRunStatus.NOT_STARTED,
                                       root_run_id=parent.root_run_id or parent.run_id,
                                       parent_run_id=parent.run_id, job_code_origin=job_code_origin)


defs = Definitions(
    jobs=[fan_in_optional, dynamic_collect, nested_dynamic, mapped_graph_dynamic, empty_dynamic, retry_success,
          retry_exhausted, retry_requested, fail_abandon, optional_skip, priorities, subset_diamond, reexec_mixed,
          slow,
          _asset_check_job],
    assets=[ac_raw, ac_clean, ac_raw2, ac_clean2],
    asset_checks=[ac_raw_check],
)


def _step_outcomes(instance, run_id):
    out = {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is not None and ev.step_key and ev.event_type_value in (
                "STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED", "STEP_UP_FOR_RETRY"):
            out.setdefault(ev.step_key, []).append(ev.event_type_value.replace("STEP_", "").lower())
    return out


def main():
    """Builds every shape's plan; with --execute also runs each shape in process (ephemeral instance, in-process
    executor, retries enabled) and prints each step's outcomes, to check the ops behave as described."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--execute", action="store_true")
    a = p.parse_args()
    for name, spec in SHAPES.items():
        job_def = spec.job.get_subset(op_selection=spec.op_selection) if spec.op_selection else spec.job
        plan = create_execution_plan(job_def, spec.run_config)
        print(f"{name}: job={spec.job.name} steps={plan.step_keys_to_execute}")
    if not a.execute:
        return
    from dagster import DagsterInstance

    with DagsterInstance.ephemeral() as instance:
        for name, spec in SHAPES.items():
            if spec.create in ("plain", "op_selection"):
                result = spec.job.execute_in_process(run_config=spec.run_config, instance=instance,
                                                     op_selection=spec.op_selection, raise_on_error=False)
                print(f"{name}: {'success' if result.success else 'failure'} {_step_outcomes(instance, result.run_id)}")
            else:
                run = create_run(instance, spec)
                parent = instance.get_run_by_id(run.parent_run_id)
                print(f"{name}: parent {parent.status.value} {_step_outcomes(instance, parent.run_id)}; "
                      f"child step_keys_to_execute={run.step_keys_to_execute}")


if __name__ == "__main__":
    main()
