"""What every rank of a map holds (``Sweep``) and how the map ended (``Outcome``): plain data shared by the job
execution, the reuse rules, the MPI loops and the engines' replies to the kernel."""

from dataclasses import dataclass, field

from . import errors
from .errors import UsageError

CODE_CHANGE_POLICIES = ("warn", "reuse", "recompute", "error")


@dataclass(frozen=True)
class Spelling:
    """How the caller's users write an option, for advice in messages: a script passes ``retries=N``, a
    notebook cell writes ``--retries N``."""

    retries: str = "retries=N"
    force: str = "force=True"
    reuse: str = "on_code_change='reuse'"


SCRIPT_SPELLING = Spelling()


@dataclass(frozen=True)
class Sweep:
    """Everything a rank needs to take part in one map: identical on every rank, never changed once built."""

    fn: object
    args: list
    output: str
    retries: int = 0
    force: bool = False
    on_code_change: str = "warn"
    chunksize: int | None = None
    verbose: bool = False
    fingerprint: str = ""
    function_name: str = ""
    timeout: float | None = None  # seconds a job may run before it is stopped and recorded as failed
    prune: bool = False  # after success, drop stored results whose argument is not in this grid
    monitor: object = None  # called on rank 0 with each status.RunStatus written (a text progress view, say)
    spelling: Spelling = SCRIPT_SPELLING  # how messages name the options
    echo_output: bool = True  # a job's printed output also goes to this rank's stdout/stderr (scripts)

    def __post_init__(self):
        if self.on_code_change not in CODE_CHANGE_POLICIES:
            raise UsageError(f"on_code_change={self.on_code_change!r} is not one of {CODE_CHANGE_POLICIES}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise UsageError(f"retries={self.retries!r} must be a whole number >= 0")
        if self.chunksize is not None and (not isinstance(self.chunksize, int) or self.chunksize < 1):
            raise UsageError(f"chunksize={self.chunksize!r} must be a whole number >= 1 (or None to adapt)")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not 0 < self.timeout < 1e9):
            raise UsageError(f"timeout={self.timeout!r} must be a number of seconds > 0 (or None for no limit)")
        if not callable(self.fn):
            raise UsageError(f"the job function must be callable, got {type(self.fn).__name__}")
        if not self.function_name:
            object.__setattr__(self, "function_name", getattr(self.fn, "__qualname__", type(self.fn).__name__))


@dataclass
class Outcome:
    """How a map ended, as rank 0 tells every rank and every engine tells the kernel: success (the results are
    in the store), or the error to raise, by class name, with the failed jobs and the map's size."""

    ok: bool = False
    error_type: str = ""
    message: str = ""
    failures: dict = field(default_factory=dict)
    total: int = 0

    @classmethod
    def from_exception(cls, exc):
        if isinstance(exc, errors.MPITaskerError):
            return cls(error_type=type(exc).__name__, message=str(exc), failures=dict(getattr(exc, "failures", {})),
                       total=getattr(exc, "total", 0))
        return cls(error_type="MPITaskerError", message=f"rank 0 could not run the map: {exc}")

    def raise_error(self, on_root):
        """Rank 0 (and the kernel) shows the whole story; the other ranks a one-line version of the same error."""
        message = self.message
        if self.error_type == "JobsFailed" and not on_root:
            message = message.split("\n", 1)[0] + " (rank 0 shows the traceback)"
        raise errors.rebuild(self.error_type, message, self.failures, self.total)
