"""Spread many similar jobs over MPI ranks with a restartable on-disk cache."""

from .errors import CacheError, CodeChanged, JobsFailed, MPITaskerError, RunLocked, UsageError, WorkerError
from .tasker import Tasker, mpimap

__version__ = "0.1.0"

__all__ = ["Tasker", "mpimap", "MPITaskerError", "UsageError", "CacheError", "RunLocked", "CodeChanged",
           "JobsFailed", "WorkerError", "__version__"]
