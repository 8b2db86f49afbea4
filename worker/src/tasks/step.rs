//! `execute_step_k8s_job`: Dagster's celery-k8s step task.
