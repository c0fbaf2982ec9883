"""Spread many similar jobs over MPI ranks with a restartable on-disk cache."""

from .errors import CacheError, CodeChanged, JobsFailed, MPITaskerError, RunLocked, UsageError, WorkerError
from .joboutput import job_output
from .results import load
from .tasker import Tasker, mpimap

__version__ = "0.1.0"


def _jupyter_server_extension_points():
    """Jupyter server finds the run dashboard (/mpitasker/) through this."""
    return [{"module": "mpitasker_ext"}]


def _load_jupyter_server_extension(serverapp):
    from .server import load

    load(serverapp)


def load_ipython_extension(ipython):
    """%load_ext mpitasker_ext: registers %%mpimap and %mpicluster."""
    from .magics import load

    load(ipython)

__all__ = ["Tasker", "mpimap", "load", "job_output", "MPITaskerError", "UsageError", "CacheError", "RunLocked",
           "CodeChanged", "JobsFailed", "WorkerError", "load_ipython_extension", "__version__"]
