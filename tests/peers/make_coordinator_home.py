"""Creates a Postgres-backed Dagster home whose run launcher is dagster_celeriac.CeleriacRunLauncher.

usage: make_coordinator_home.py <dir> --db <dbname> --broker URL --backend URL [--namespace NS]
         [--kubeconfig PATH | --incluster] [--image IMAGE] [--heartbeat-timeout S] [--handoff-executors a,b] [--queued]

Mirrors make_instance.py (same launcher config, same run_config.yaml) and adds
`run_monitoring: {enabled: true, poll_interval_seconds: 5}`, DefaultRunCoordinator (unless --queued: dagster
1.13's default run coordinator is the QueuedRunCoordinator, whose submit_run only enqueues), plus
`workspace.yaml` with two code locations: `plan_shapes` (tests/peers/plan_shapes.py, celery-k8s jobs) and `coordinator_extras`
(tests/peers/coordinator_workspace.py, an in-process job). The plugin must already be installed
(`pip install -e coordinator/python`); this script installs nothing. Prints the home directory.
"""
import argparse
import os

import psycopg2
import yaml

from instance_schema import create_schema

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--db", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--namespace", default="default", help="job_namespace of the step Jobs")
    p.add_argument("--kubeconfig", help="kubeconfig_file for the step Jobs (default: a never-contacted one)")
    p.add_argument("--incluster", action="store_true",
                   help="executor load_incluster_config: true (the worker's own credentials), as the Dagster chart runs it")
    p.add_argument("--image", default="celeriac/local-step:dev", help="job_image of the step Jobs")
    p.add_argument("--heartbeat-timeout", type=float, default=60.0, help="coordinator_heartbeat_timeout (s)")
    p.add_argument("--handoff-executors", default="celery-k8s", help="comma-separated handoff_executors")
    p.add_argument("--queued", action="store_true",
                   help="keep Dagster's default QueuedRunCoordinator (runs wait QUEUED for dagster-daemon, as in the "
                        "Helm chart) instead of DefaultRunCoordinator (submit_run launches synchronously)")
    a = p.parse_args()
    home = os.path.abspath(a.dir)
    os.makedirs(home, exist_ok=True)

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (a.db,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{a.db}"')
    conn.close()

    kubeconfig = a.kubeconfig or os.path.join(home, "kubeconfig.yaml")
    if not a.kubeconfig:
        with open(kubeconfig, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "never-contacted",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}}],
                "users": [{"name": "none", "user": {"token": "unused"}}],
                "contexts": [{"name": "never-contacted", "context": {"cluster": "none", "user": "none"}}],
            }, f)

    pg = {"username": "postgres", "password": {"env": "DAGSTER_PG_PASSWORD"}, "hostname": "127.0.0.1",
          "db_name": a.db, "port": 5432}
    instance = {
        "storage": {"postgres": {"postgres_db": pg}},
        "run_launcher": {
            "module": "dagster_celeriac",
            "class": "CeleriacRunLauncher",
            "config": {
                "instance_config_map": "dagster-instance",
                "dagster_home": home,
                "postgres_password_secret": "dagster-postgresql-secret",
                "load_incluster_config": False,
                "kubeconfig_file": kubeconfig,
                "broker": a.broker,
                "backend": a.backend,
                "coordinator_heartbeat_timeout": a.heartbeat_timeout,
                "handoff_executors": [e.strip() for e in a.handoff_executors.split(",") if e.strip()],
            },
        },
        "run_monitoring": {"enabled": True, "poll_interval_seconds": 5},
        **({} if a.queued else {"run_coordinator": {"module": "dagster._core.run_coordinator",
                                                    "class": "DefaultRunCoordinator"}}),
        "telemetry": {"enabled": False},
    }
    with open(os.path.join(home, "dagster.yaml"), "w") as f:
        yaml.safe_dump(instance, f)
    create_schema(home, {"DAGSTER_PG_PASSWORD": "unused-with-trust-auth"})

    workspace = {"load_from": [
        {"python_file": {"relative_path": os.path.join(HERE, "plan_shapes.py"), "location_name": "plan_shapes",
                         "attribute": "defs", "working_directory": HERE}},  # plan_shapes has 2 Definitions
        {"python_file": {"relative_path": os.path.join(HERE, "coordinator_workspace.py"),
                         "location_name": "coordinator_extras", "working_directory": HERE}},
    ]}
    with open(os.path.join(home, "workspace.yaml"), "w") as f:
        yaml.safe_dump(workspace, f)

    run_config = {"execution": {"config": {
        "job_image": a.image,
        "job_namespace": a.namespace,
        **({"load_incluster_config": True} if a.incluster
           else {"load_incluster_config": False, "kubeconfig_file": kubeconfig}),
        "job_wait_timeout": 600.0,
        "broker": a.broker,
        "backend": a.backend,
    }}}
    with open(os.path.join(home, "run_config.yaml"), "w") as f:
        yaml.safe_dump(run_config, f)
    print(home)


if __name__ == "__main__":
    main()
