"""Creates a Postgres-backed Dagster instance home for celery_k8s_job_executor runs.

usage: make_instance.py <dir> --db <dbname> --broker URL --backend URL
"""
import argparse
import os

import psycopg2
import yaml

from instance_schema import create_schema


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
    p.add_argument("--pg-port-env", help="the Postgres port is read from this environment variable ({env: VAR}) "
                   "by every process (so a test can route one process elsewhere)")
    p.add_argument("--pg-direct-step", action="append", default=[],
                   help="with --pg-port-env: this step's process gets VAR=5432 through per_step_k8s_config's "
                        "container env (the executor's env_vars is accepted but dropped by dagster-celery-k8s)")
    p.add_argument("--pg-password", help="the Postgres password written literally into dagster.yaml (the instance "
                   "config every step task carries) instead of {env: DAGSTER_PG_PASSWORD}; trust auth ignores it")
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

    pg = {"username": "postgres", "password": a.pg_password or {"env": "DAGSTER_PG_PASSWORD"}, "hostname": "127.0.0.1",
          "db_name": a.db, "port": {"env": a.pg_port_env} if a.pg_port_env else 5432}
    instance = {
        "storage": {"postgres": {"postgres_db": pg}},
        "run_launcher": {
            "module": "dagster_celery_k8s",
            "class": "CeleryK8sRunLauncher",
            "config": {
                "instance_config_map": "dagster-instance",
                "dagster_home": home,
                "postgres_password_secret": "dagster-postgresql-secret",
                "load_incluster_config": False,
                "kubeconfig_file": kubeconfig,
                "broker": a.broker,
                "backend": a.backend,
            },
        },
        "telemetry": {"enabled": False},
    }
    with open(os.path.join(home, "dagster.yaml"), "w") as f:
        yaml.safe_dump(instance, f)
    create_schema(home, {"DAGSTER_PG_PASSWORD": "unused-with-trust-auth", **({a.pg_port_env: "5432"} if a.pg_port_env else {})})

    run_config = {"execution": {"config": {
        "job_image": a.image,
        "job_namespace": a.namespace,
        **({"load_incluster_config": True} if a.incluster
           else {"load_incluster_config": False, "kubeconfig_file": kubeconfig}),
        "job_wait_timeout": 600.0,
        **({"per_step_k8s_config": {
            step: {"container_config": {"env": [{"name": a.pg_port_env, "value": "5432"}]}}
            for step in a.pg_direct_step}} if a.pg_port_env and a.pg_direct_step else {}),
        "broker": a.broker,
        "backend": a.backend,
    }}}
    with open(os.path.join(home, "run_config.yaml"), "w") as f:
        yaml.safe_dump(run_config, f)
    print(home)


if __name__ == "__main__":
    main()
