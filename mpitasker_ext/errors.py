"""The small family of errors users see; each message says what to do next."""


class MPITaskerError(Exception):
    """Base class: anything mpitasker_ext raises on purpose."""

    def _render_traceback_(self):
        """IPython shows this instead of a traceback through our internals: the message tells the whole story."""
        lines = str(self).splitlines() or [""]
        return [f"{type(self).__name__}: {lines[0]}", *lines[1:]]


class UsageError(MPITaskerError, ValueError):
    """A bad argument, caught before anything ran or was written."""


class CacheError(MPITaskerError):
    """The run directory cannot be used (unwritable, locked, disk full)."""


class RunLocked(CacheError):
    """Another live process is running the same output path."""


class CodeChanged(MPITaskerError):
    """The cached records were made by different code; the caller must choose reuse or recompute."""


class WorkerError(MPITaskerError):
    """A rank failed outside of a job (I/O error, lost process); finished records are kept."""


class JobsFailed(MPITaskerError):
    """Some jobs raised. The others finished and are cached; a rerun computes only the failed ones.

    ``failures`` maps each failed job index to its traceback text.
    """

    def __init__(self, message, failures=None, total=0):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.total = total

    @property
    def indices(self):
        return sorted(self.failures)
