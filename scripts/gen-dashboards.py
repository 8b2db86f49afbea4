#!/usr/bin/env python3
"""Writes the chart's Grafana dashboards (charts/celeriac/dashboards/*.json).

Every expression uses only series a celeriac worker, flower-compat or the run coordinator exports; the
chart test (tests/tests/helm_chart.rs) checks each metric name against live /metrics scrapes of a worker
and flower-compat, and the coordinator's (celeriac_coordinator_*) against its list of metric names.
"""
import json
import os

OUT = os.path.join(os.path.dirname(__file__), "..", "charts", "celeriac", "dashboards")
JOB = 'job=~"$job"'
# The run coordinator's own scrape job ("<release>-celeriac-coordinator").
CJOB = 'job=~"$coordinator_job"'


def ts(title, exprs, unit="short", w=12, h=8, legend="{{queue_name}}"):
    return {"type": "timeseries", "title": title, "gridPos": {"w": w, "h": h},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": lf}
                        for i, (e, lf) in enumerate(exprs if isinstance(exprs[0], tuple) else [(x, legend) for x in exprs])]}


def stat(title, expr, unit="short", w=6):
    return {"type": "stat", "title": title, "gridPos": {"w": w, "h": 4},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": "A", "expr": expr}]}


def row(title):
    """A (never collapsed) row: its panels follow it at the top level of the dashboard."""
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def var(name, query, label=None, include_all=True):
    return {"name": name, "label": label or name, "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query,
            "includeAll": include_all, "multi": include_all, "refresh": 2, "sort": 1}


def dashboard(uid, title, panels, variables):
    y = x = 0
    row_h = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"].update({"x": x, "y": y})
        x += w
        row_h = max(row_h, h)
    templating = [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
                  var("job", "label_values(celery_worker_up, job)", "Job", True)] + variables
    return {"uid": uid, "title": title, "tags": ["celeriac", "celery", "dagster"], "timezone": "",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "panels": panels,
            "templating": {"list": templating}, "annotations": {"list": []}}


fleet = dashboard("celeriac-fleet", "celeriac / Fleet overview", [
    stat("Workers consuming", f'sum(celery_worker_up{{{JOB}}})'),
    stat("Steps running", f'sum(celery_worker_tasks_active{{{JOB}}})'),
    stat("Steps waiting", f'sum(max by (queue_name) (celery_queue_length{{{JOB}}}))'),
    stat("Free slots", f'sum(celeriac_queue_free_slots{{{JOB}}})'),
    ts("Backlog per queue (waiting + running)",
       [f'max by (queue_name) (celery_queue_length{{{JOB}}}) + sum by (queue_name) (celeriac_queue_in_flight{{{JOB}}})']),
    ts("Steps finished per second", [
        (f'sum by (queue_name) (rate(celery_task_succeeded_total{{{JOB}}}[$__rate_interval]))', "{{queue_name}} succeeded"),
        (f'sum by (queue_name) (rate(celery_task_failed_total{{{JOB}}}[$__rate_interval]))', "{{queue_name}} failed"),
    ], unit="ops"),
    ts("Task runtime p50 / p95", [
        (f'histogram_quantile(0.5, sum by (le) (rate(celery_task_runtime_bucket{{{JOB}}}[$__rate_interval])))', "p50"),
        (f'histogram_quantile(0.95, sum by (le) (rate(celery_task_runtime_bucket{{{JOB}}}[$__rate_interval])))', "p95"),
    ], unit="s"),
    ts("Step Jobs by action", [(f'sum by (action) (rate(celeriac_step_jobs_total{{{JOB}}}[$__rate_interval]))', "{{action}}")], unit="ops"),
    ts("Kubernetes API latency p99 by verb", [
        (f'histogram_quantile(0.99, sum by (le, verb) (rate(celeriac_kubernetes_api_request_duration_seconds_bucket{{{JOB}}}[$__rate_interval])))', "{{verb}}")], unit="s"),
    ts("Kubernetes API errors", [(f'sum by (verb, code) (rate(celeriac_kubernetes_api_errors_total{{{JOB}}}[$__rate_interval]))', "{{verb}} {{code}}")], unit="ops"),
    ts("Broker reconnects (1h)", [(f'sum by (hostname) (increase(celeriac_broker_reconnects_total{{{JOB}}}[1h]))', "{{hostname}}")]),
    ts("Workers online (flower-compat)", [('sum(flower_worker_online)', "online")]),
    # The run coordinator (`coordinator.enabled`): the runs it drives instead of Python run workers.
    row("Run coordinator"),
    stat("Coordinators up", f'count(celeriac_coordinator_runs_owned{{{CJOB}}})'),
    stat("Runs owned", f'sum(celeriac_coordinator_runs_owned{{{CJOB}}})'),
    stat("Steps in flight", f'sum(celeriac_coordinator_steps_in_flight{{{CJOB}}})'),
    stat("Longest without progress", f'max(celeriac_coordinator_seconds_since_progress{{{CJOB}}})', unit="s"),
    ts("Runs owned per replica", [(f'sum by (pod) (celeriac_coordinator_runs_owned{{{CJOB}}})', "{{pod}}")]),
    ts("Steps in flight per replica", [(f'sum by (pod) (celeriac_coordinator_steps_in_flight{{{CJOB}}})', "{{pod}}")]),
    ts("Step result to next submit p50 / p99", [
        (f'histogram_quantile(0.5, sum by (le) (rate(celeriac_coordinator_result_to_submit_seconds_bucket{{{CJOB}}}[$__rate_interval])))', "p50"),
        (f'histogram_quantile(0.99, sum by (le) (rate(celeriac_coordinator_result_to_submit_seconds_bucket{{{CJOB}}}[$__rate_interval])))', "p99"),
    ], unit="s"),
    ts("Run launch to first step submitted p99", [
        (f'histogram_quantile(0.99, sum by (le) (rate(celeriac_coordinator_launch_to_first_submit_seconds_bucket{{{CJOB}}}[$__rate_interval])))', "p99"),
    ], unit="s"),
    ts("Runs finished by status", [
        (f'sum by (status) (increase(celeriac_coordinator_runs_finished_total{{{CJOB}}}[$__rate_interval]))', "{{status}}")]),
    ts("Takeovers of a dead replica's runs", [
        (f'sum by (pod) (increase(celeriac_coordinator_takeovers_total{{{CJOB}}}[$__rate_interval]))', "{{pod}}")]),
    ts("Seconds since progress (worst run per replica)", [
        (f'max by (pod) (celeriac_coordinator_seconds_since_progress{{{CJOB}}})', "{{pod}}")], unit="s"),
    ts("Lease renewals per second", [
        (f'sum by (pod) (rate(celeriac_coordinator_leases_renewed_total{{{CJOB}}}[$__rate_interval]))', "{{pod}}")], unit="ops"),
], [var("coordinator_job", "label_values(celeriac_coordinator_runs_owned, job)", "Coordinator job")])

queue = dashboard("celeriac-queue", "celeriac / Queue", [
    stat("Waiting in the broker", f'max(celery_queue_length{{{JOB}, queue_name=~"$queue"}})'),
    stat("Running", f'sum(celeriac_queue_in_flight{{{JOB}, queue_name=~"$queue"}})'),
    stat("Free slots", f'sum(celeriac_queue_free_slots{{{JOB}, queue_name=~"$queue"}})'),
    stat("Workers", f'count(celeriac_queue_free_slots{{{JOB}, queue_name=~"$queue"}})'),
    ts("Waiting vs running", [
        (f'max by (queue_name) (celery_queue_length{{{JOB}, queue_name=~"$queue"}})', "{{queue_name}} waiting"),
        (f'sum by (queue_name) (celeriac_queue_in_flight{{{JOB}, queue_name=~"$queue"}})', "{{queue_name}} running"),
    ]),
    ts("Running per worker", [(f'celeriac_queue_in_flight{{{JOB}, queue_name=~"$queue"}}', "{{hostname}}")]),
    ts("Received / started / succeeded / failed", [
        (f'sum(rate(celery_task_received_total{{{JOB}, queue_name=~"$queue"}}[$__rate_interval]))', "received"),
        (f'sum(rate(celery_task_started_total{{{JOB}, queue_name=~"$queue"}}[$__rate_interval]))', "started"),
        (f'sum(rate(celery_task_succeeded_total{{{JOB}, queue_name=~"$queue"}}[$__rate_interval]))', "succeeded"),
        (f'sum(rate(celery_task_failed_total{{{JOB}, queue_name=~"$queue"}}[$__rate_interval]))', "failed"),
    ], unit="ops"),
    ts("Rejected / revoked / retried", [
        (f'sum(rate(celery_task_rejected_total{{{JOB}, queue_name=~"$queue"}}[$__rate_interval]))', "rejected"),
        (f'sum(rate(celery_task_revoked_total{{{JOB}, queue_name=~"$queue"}}[$__rate_interval]))', "revoked"),
        (f'sum(rate(celery_task_retried_total{{{JOB}, queue_name=~"$queue"}}[$__rate_interval]))', "retried"),
    ], unit="ops"),
    ts("Task runtime p95", [(f'histogram_quantile(0.95, sum by (le, queue_name) (rate(celery_task_runtime_bucket{{{JOB}, queue_name=~"$queue"}}[$__rate_interval])))', "{{queue_name}}")], unit="s"),
    ts("Step Job creation latency p95", [(f'histogram_quantile(0.95, sum by (le, namespace) (rate(celeriac_step_job_create_latency_seconds_bucket{{{JOB}}}[$__rate_interval])))', "{{namespace}}")], unit="s"),
    ts("Job end to result p95", [(f'histogram_quantile(0.95, sum by (le, namespace) (rate(celeriac_step_job_result_latency_seconds_bucket{{{JOB}}}[$__rate_interval])))', "{{namespace}}")], unit="s"),
    ts("Result store latency p95", [(f'histogram_quantile(0.95, sum by (le, backend) (rate(celeriac_result_store_seconds_bucket{{{JOB}}}[$__rate_interval])))', "{{backend}}")], unit="s"),
], [var("queue", "label_values(celery_queue_length, queue_name)", "Queue")])

jobs = dashboard("celeriac-dagster-jobs", "celeriac / Dagster jobs", [
    stat("Steps finished (range)", f'sum(increase(celeriac_dagster_steps_total{{{JOB}, dagster_job=~"$dagster_job"}}[$__range]))'),
    stat("Failed or not launched (range)", f'sum(increase(celeriac_dagster_steps_total{{{JOB}, dagster_job=~"$dagster_job", outcome=~"failure|error"}}[$__range]))'),
    stat("Cancelled (range)", f'sum(increase(celeriac_dagster_steps_total{{{JOB}, dagster_job=~"$dagster_job", outcome="cancelled"}}[$__range]))'),
    stat("Step p95 (range)", f'histogram_quantile(0.95, sum by (le) (increase(celeriac_dagster_step_duration_seconds_bucket{{{JOB}, dagster_job=~"$dagster_job"}}[$__range])))', unit="s"),
    ts("Steps by outcome", [(f'sum by (dagster_job, outcome) (rate(celeriac_dagster_steps_total{{{JOB}, dagster_job=~"$dagster_job"}}[$__rate_interval]))', "{{dagster_job}} {{outcome}}")], unit="ops"),
    ts("Failure ratio", [(f'sum by (dagster_job) (rate(celeriac_dagster_steps_total{{{JOB}, dagster_job=~"$dagster_job", outcome=~"failure|error"}}[$__rate_interval])) / sum by (dagster_job) (rate(celeriac_dagster_steps_total{{{JOB}, dagster_job=~"$dagster_job"}}[$__rate_interval]))', "{{dagster_job}}")], unit="percentunit"),
    ts("Step duration p50 / p95", [
        (f'histogram_quantile(0.5, sum by (le, dagster_job) (rate(celeriac_dagster_step_duration_seconds_bucket{{{JOB}, dagster_job=~"$dagster_job"}}[$__rate_interval])))', "{{dagster_job}} p50"),
        (f'histogram_quantile(0.95, sum by (le, dagster_job) (rate(celeriac_dagster_step_duration_seconds_bucket{{{JOB}, dagster_job=~"$dagster_job"}}[$__rate_interval])))', "{{dagster_job}} p95"),
    ], unit="s"),
    ts("Mean step duration", [(f'sum by (dagster_job) (rate(celeriac_dagster_step_duration_seconds_sum{{{JOB}, dagster_job=~"$dagster_job"}}[$__rate_interval])) / sum by (dagster_job) (rate(celeriac_dagster_step_duration_seconds_count{{{JOB}, dagster_job=~"$dagster_job"}}[$__rate_interval]))', "{{dagster_job}}")], unit="s"),
], [var("dagster_job", "label_values(celeriac_dagster_steps_total, dagster_job)", "Dagster job")])

for name, d in [("fleet", fleet), ("queue", queue), ("dagster-jobs", jobs)]:
    with open(os.path.join(OUT, f"celeriac-{name}.json"), "w") as f:
        json.dump(d, f, indent=1)
        f.write("\n")
