"""zps launcher: the ``zps`` command, the coordinator, the job lifecycle and the backends that start processes."""
from .coordinator import Coordinator
from .job import Backend, LaunchError, ProcSpec, run_job
from .local import LocalBackend, run_local

__all__ = ["Backend", "Coordinator", "LaunchError", "LocalBackend", "ProcSpec", "run_job", "run_local"]
