//! Celery's `redis://` result backend.
