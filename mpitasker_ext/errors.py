"""The small family of errors users see; each message says what to do next.

An error raised on one MPI rank (or engine) travels to the others, and to the kernel, as its class name and
message (``sweep.Outcome``); ``rebuild`` raises it again there as the same class, wherever in the package that
class is defined.
"""


class MPITaskerError(Exception):
    """Base class: anything mpitasker_ext raises on purpose."""

    def _render_traceback_(self):
        """IPython shows this instead of a traceback through our internals: the message tells the whole story."""
        lines = str(self).splitlines() or [""]
        return [f"{type(self).__name__}: {lines[0]}", *lines[1:]]


class UsageError(MPITaskerError, ValueError):
    """A bad argument, caught before anything ran or was written."""


class ClosureError(UsageError):
    """A name of the cell cannot be shipped to the engines (undefined or unpicklable)."""


class CacheError(MPITaskerError):
    """The run directory cannot be used (unwritable, locked, disk full)."""


class RunLocked(CacheError):
    """Another live process is running the same output path."""


class CodeChanged(MPITaskerError):
    """The cached records were made by different code; the caller must choose reuse or recompute."""


class WorkerError(MPITaskerError):
    """A rank failed outside of a job (I/O error, lost process); finished records are kept."""


class ClusterError(MPITaskerError):
    """No usable cluster, or engines that are not one MPI world."""


class EnginesDied(ClusterError):
    """Engines died during a run; finished jobs are kept and the cluster must be restarted."""


class JobsFailed(MPITaskerError):
    """Some jobs raised. The others finished and are cached; a rerun computes only the failed ones.

    ``failures`` maps each failed job index to its traceback text; ``total`` is the number of jobs in the map.
    """

    def __init__(self, message, failures=None, total=0):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.total = total

    @property
    def indices(self):
        return sorted(self.failures)


def error_class(name):
    """The package's error class called ``name``, in whichever of its modules it is defined (``store`` has its
    own); ``MPITaskerError`` for a name the package does not define."""
    pending = [MPITaskerError]
    while pending:
        kind = pending.pop()
        if kind.__name__ == name and kind.__module__.partition(".")[0] == __name__.partition(".")[0]:
            return kind
        pending.extend(kind.__subclasses__())
    return MPITaskerError


def rebuild(name, message, failures=None, total=0):
    """The error another process raised, as the same class with the same message. Built without calling the
    class's ``__init__``, whose arguments may not be a message (as pickle would need)."""
    kind = error_class(name)
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    if issubclass(kind, JobsFailed):
        error.failures, error.total = dict(failures or {}), total
    return error
