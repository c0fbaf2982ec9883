"""The status file of a run (``status.json``) and the states a run can be in: one format, built by rank 0's
ledger, read back by every view.

The file may have been planted by anyone who can write under a shared project directory, so
``RunStatus.from_json`` checks the type of every field and never raises: a field of the wrong type reads as
missing, a malformed rank or failure entry is dropped, and nothing is unpickled (the file is JSON).
"""

import math
from dataclasses import dataclass

from .journal import FORMAT_VERSION

RUNNING = "running"  # rank 0 is at work
FINISHED = "finished"  # the output is written and the run directory removed
FAILED = "failed"  # some jobs failed: the run directory and every finished record stay
ERROR = "error"  # rank 0 stopped on an error outside any job (a full disk, a lost worker)
INTERRUPTED = "interrupted"  # rank 0 stopped on KeyboardInterrupt
STALE = "stale"  # never written: the status says running, but its writer is gone
MISSING = "missing"  # never written: neither a run directory nor an output
STATES = (RUNNING, FINISHED, FAILED, ERROR, INTERRUPTED, STALE, MISSING)

SHOWN_FAILURES = 20  # failures a status lists (the first by job index), each traceback cut to MAX_TRACEBACK
MAX_TRACEBACK = 4000  # characters of a traceback kept in a status
MAX_FAILURE_OUTPUT = 4000  # characters of a failed job's printed output kept in a status (its end)
MAX_INT = 2 ** 53 - 1  # the largest integer a field may hold: JSON has no bound, floats and JavaScript do
MAX_ERROR = 1000  # characters of a failure's error line kept (its start: the type and what it says first)


def job_place(rank, host):
    """Where a job ran, as messages say it ("rank 2 on node7"); '' when its record does not say."""
    place = "" if rank is None else f"rank {rank}"
    if host:
        place = f"{place} on {host}" if place else f"host {host}"
    return place


@dataclass
class RankState:
    """One rank's line: the first job of the batch it is running (None when idle), that batch's size, its
    counts."""

    rank: int
    current: int | None = None
    batch: int = 0
    done: int = 0
    failed: int = 0


@dataclass
class Failure:
    """A failed job as the views show it; ``rank`` and ``host`` say where it ran (None and '' in records
    written before they were kept), ``output`` the end of what it printed ('' when nothing)."""

    index: int
    error: str
    traceback: str = ""
    rank: int | None = None
    host: str = ""
    output: str = ""

    @property
    def place(self):
        return job_place(self.rank, self.host)

    def to_json(self):
        return {"index": self.index, "error": self.error, "traceback": self.traceback, "rank": self.rank,
                "host": self.host, "output": self.output}


@dataclass(frozen=True)
class RunStatus:
    """What ``status.json`` holds: rank 0's counts, each rank's state and the first failures, so its size
    depends on the ranks and not on the jobs. ``state`` is one of ``STATES``."""

    state: str
    output: str = ""
    total: int = 0
    done: int = 0
    cached: int = 0
    computed: int = 0
    failed: int = 0
    running: int = 0
    pending: int = 0
    rate: float = 0.0
    started: float | None = None
    updated: float | None = None
    host: str = ""
    pid: int | None = None
    workers: int = 0
    ranks: tuple = ()  # RankState, by rank
    failures: tuple = ()  # Failure, by job index
    format: int = FORMAT_VERSION

    def __post_init__(self):
        if self.state not in STATES:
            raise ValueError(f"{self.state!r} is not a run state: one of {STATES}")

    def to_json(self):
        """The file's JSON object: ``ranks`` keyed by the rank as a string, ``current`` as [first job, count]."""
        return {
            "format": self.format, "state": self.state, "output": self.output, "total": self.total,
            "done": self.done, "cached": self.cached, "computed": self.computed, "failed": self.failed,
            "running": self.running, "pending": self.pending, "rate": self.rate, "started": self.started,
            "updated": self.updated, "host": self.host, "pid": self.pid, "workers": self.workers,
            "ranks": {str(r.rank): {"current": None if r.current is None else [r.current, r.batch],
                                    "done": r.done, "failed": r.failed} for r in self.ranks},
            "failures": [f.to_json() for f in self.failures],
        }

    @classmethod
    def from_json(cls, data):
        """The status a file's JSON object describes. Counts must be ints (not bools, within ``MAX_INT``),
        ``rate``/``started``/
        ``updated`` finite numbers, texts strings, ``state`` one of ``STATES``; anything else reads as missing
        (0, None, '' or running). Never raises."""
        data = data if isinstance(data, dict) else {}
        state = text_field(data, "state")
        return cls(
            state=state if state in STATES else RUNNING, output=text_field(data, "output"),
            total=int_field(data, "total"), done=int_field(data, "done"), cached=int_field(data, "cached"),
            computed=int_field(data, "computed"), failed=int_field(data, "failed"),
            running=int_field(data, "running"), pending=int_field(data, "pending"),
            rate=number_field(data, "rate", 0.0), started=number_field(data, "started", None),
            updated=number_field(data, "updated", None), host=text_field(data, "host"),
            pid=int_field(data, "pid", None), workers=int_field(data, "workers"),
            ranks=_ranks(data.get("ranks")), failures=_failures(data.get("failures")),
            format=int_field(data, "format", FORMAT_VERSION))


def int_field(data, key, default=0):
    """``data[key]`` if it is an int (not a bool, not a string that looks like a number) within ``MAX_INT``, else
    ``default``."""
    value = data.get(key)
    return value if is_int(value) else default


def is_int(value):
    """An int that any reader can divide and show: not a bool, and no larger than ``MAX_INT`` (a planted
    10**400 made every division raise OverflowError)."""
    return type(value) is int and -MAX_INT <= value <= MAX_INT


def number_field(data, key, default):
    """``data[key]`` as a float if it is a finite number (NaN or Infinity would not survive the JSON API)."""
    value = data.get(key)
    if type(value) not in (int, float):
        return default
    try:
        value = float(value)
    except OverflowError:
        return default
    return value if math.isfinite(value) else default


def text_field(data, key, default=""):
    value = data.get(key)
    return value if isinstance(value, str) else default


def _ranks(ranks):
    """``{"<rank>": {"current": [first, length] or None, "done", "failed"}}``; malformed entries are dropped."""
    if not isinstance(ranks, dict):
        return ()
    found = []
    for key, info in ranks.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10 and isinstance(info, dict)):
            continue
        current = info.get("current")
        if not (isinstance(current, list) and len(current) == 2 and all(is_int(v) for v in current)):
            current = None
        found.append(RankState(int(key), current[0] if current else None, current[1] if current else 0,
                               int_field(info, "done"), int_field(info, "failed")))
    return tuple(sorted(found, key=lambda r: r.rank))


def _failures(failures):
    """``[{"index", "error", "traceback", "rank", "host", "output"}]``: an entry without an int index or with
    non-text error or traceback is dropped; a rank, host or output of the wrong type (or none, in older files)
    reads as unknown (no output)."""
    if not isinstance(failures, list):
        return ()
    found = []
    for f in failures:
        if isinstance(f, dict) and is_int(f.get("index")):
            error, text = f.get("error", ""), f.get("traceback", "")
            if isinstance(error, str) and isinstance(text, str):
                found.append(Failure(f["index"], error, text, int_field(f, "rank", None), text_field(f, "host"),
                                     text_field(f, "output")[-MAX_FAILURE_OUTPUT:]))
    return tuple(found)
