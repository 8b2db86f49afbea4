"""dagster-celeriac: hands celery-k8s runs to the celeriac run coordinator (see launcher.py)."""
from dagster_celeriac.launcher import HANDOFF_TABLE, NOTIFY_CHANNEL, CeleriacRunLauncher
from dagster_celeriac.version import __version__

__all__ = ["CeleriacRunLauncher", "HANDOFF_TABLE", "NOTIFY_CHANNEL", "__version__"]
