"""Test settings shared by the run worker and the step processes.

`run_job.py` writes its environment's CELERIAC_* / SLEEP_SECONDS values to `$DAGSTER_HOME/celeriac_env.json`;
step processes started by a celeriac worker get the same DAGSTER_HOME (the Job config's `dagster_home`), so
both sides build the same job definitions.
"""
import json
import os

DEFAULTS = {
    "CELERIAC_QUEUE": "dagster",
    "CELERIAC_QUEUE_A": "celeriac_qa",
    "CELERIAC_QUEUE_B": "celeriac_qb",
    "SLEEP_SECONDS": "4",
    # The secrets test's S3 key, given to the step as a container env in the op's dagster-k8s/config tag.
    "CELERIAC_S3_KEY": "",
}
KEYS = list(DEFAULTS)


def load():
    values = dict(DEFAULTS)
    home = os.environ.get("DAGSTER_HOME")
    path = os.path.join(home, "celeriac_env.json") if home else None
    if path and os.path.exists(path):
        with open(path) as f:
            values.update(json.load(f))
    for key in KEYS:
        if os.environ.get(key):
            values[key] = os.environ[key]
    return values


def save(home):
    values = {k: os.environ[k] for k in KEYS if os.environ.get(k)}
    with open(os.path.join(home, "celeriac_env.json"), "w") as f:
        json.dump(values, f)
