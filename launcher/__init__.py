"""zps launcher: the ``zps`` command, the coordinator, and the backends that start a job's processes."""
from .coordinator import Coordinator
from .job import JobSpec, run_job
from .local import run_local

__all__ = ["Coordinator", "JobSpec", "run_job", "run_local"]
