"""Creates a Dagster instance's Postgres schema once, when its home is made.

Dagster creates its tables the first time an instance opens its storage (SQLAlchemy's create_all: look, then
CREATE TABLE). Two processes opening a fresh database at the same moment (a test that runs the same shape
through Python's run worker and through the coordinator side by side) race: one fails with
`DuplicateObject: type "run_tags" already exists`, and dagster_postgres does not retry that error. Opening the
instance here, before any test process starts, makes every later open find the tables.
"""
import os


def create_schema(home, env_defaults):
    """Opens the instance of `home` (its dagster.yaml) once, so its storages create their tables.

    `env_defaults` are set for the values dagster.yaml reads from the environment ({env: VAR}) when the caller's
    environment does not have them (trust auth ignores the password; the port variable is the direct port).
    """
    for key, value in env_defaults.items():
        os.environ.setdefault(key, value)
    os.environ["DAGSTER_HOME"] = home
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        instance.get_runs_count()  # touches the run storage: the schema is there
