"""The status model of a run, read from its ``.mpi`` directory only: no MPI, no kernel, any process.

Every view (widget, text line, CLI, server page) renders this one model. A refresh reads the status file rank 0
rewrites (its size depends on the ranks, not the jobs); only when that writer is gone are the journals counted,
and that count is cached until a journal changes.

Nothing here unpickles, and every field read from a file is type-checked: anyone who can write under a shared
project directory can plant a run there, and reading it must neither run their code nor pass their markup on.
"""

import math
import os
import time
from dataclasses import asdict, dataclass, field

from .lock import writer_alive
from .rundir import META_SUFFIX, RUN_SUFFIX, RunDir
from .scan import scan_journals

STALE_AFTER = 10.0  # seconds without a heartbeat (status or lock, each every 2 s) before a remote writer is gone

RUNNING, FINISHED, FAILED, STALE, INTERRUPTED, MISSING = (
    "running", "finished", "failed", "stale", "interrupted", "missing")


@dataclass
class RankState:
    rank: int
    current: int | None = None
    batch: int = 0
    done: int = 0
    failed: int = 0


@dataclass
class Failure:
    index: int
    error: str
    traceback: str = ""


@dataclass
class Progress:
    """One snapshot of a run. ``state``: running, finished, failed, stale (its writer is gone), interrupted,
    or missing (nothing there)."""

    output: str
    state: str
    total: int = 0
    done: int = 0
    cached: int = 0
    computed: int = 0
    running: int = 0
    failed: int = 0
    pending: int = 0
    rate: float = 0.0
    elapsed: float = 0.0
    eta: float | None = None
    started: float | None = None
    updated: float | None = None
    host: str = ""
    pid: int | None = None
    ranks: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    note: str = ""

    @property
    def name(self):
        return os.path.basename(self.output)

    @property
    def fraction(self):
        return (self.done + self.failed) / self.total if self.total else (1.0 if self.state == FINISHED else 0.0)

    def to_dict(self):
        data = asdict(self)
        data["name"] = self.name
        data["fraction"] = self.fraction
        return data


def from_status(status, now=None):
    """The model of a status dict as rank 0 writes it (also used live, by rank 0's own text view). A field of
    the wrong type reads as missing: the file may be planted, and this must never raise or pass it on."""
    now = time.time() if now is None else now
    status = status if isinstance(status, dict) else {}
    state = _text(status, "state") or RUNNING
    started, updated = _number(status, "started", None), _number(status, "updated", None)
    end = now if state == RUNNING else updated
    elapsed = max(end - started, 0.0) if started and end is not None else 0.0
    progress = Progress(
        output=_text(status, "output"), state=state, total=_int(status, "total"), done=_int(status, "done"),
        cached=_int(status, "cached"), computed=_int(status, "computed"), running=_int(status, "running"),
        failed=_int(status, "failed"), pending=_int(status, "pending"), rate=_number(status, "rate", 0.0),
        elapsed=elapsed, started=started, updated=updated, host=_text(status, "host"), pid=_int(status, "pid", None),
        ranks=_ranks(status.get("ranks")), failures=_failures(status.get("failures")))
    remaining = progress.total - progress.done - progress.failed
    if progress.state == RUNNING and progress.rate > 0 and remaining > 0:
        progress.eta = remaining / progress.rate
    return progress


def _int(data, key, default=0):
    value = data.get(key)
    return value if type(value) is int else default       # not bool, not a string that looks like a number


def _number(data, key, default):
    value = data.get(key)
    if type(value) not in (int, float):
        return default
    try:
        value = float(value)
    except OverflowError:
        return default
    return value if math.isfinite(value) else default      # NaN or Infinity would not survive the JSON API


def _text(data, key, default=""):
    value = data.get(key)
    return value if isinstance(value, str) else default


def _ranks(ranks):
    """``{"<rank>": {"current": [first, length] or None, "done", "failed"}}``; malformed entries are dropped."""
    if not isinstance(ranks, dict):
        return []
    found = []
    for key, info in ranks.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10 and isinstance(info, dict)):
            continue
        current = info.get("current")
        if not (isinstance(current, list) and len(current) == 2 and all(type(v) is int for v in current)):
            current = None
        found.append(RankState(int(key), current[0] if current else None, current[1] if current else 0,
                               _int(info, "done"), _int(info, "failed")))
    return sorted(found, key=lambda r: r.rank)


def _failures(failures):
    """``[{"index", "error", "traceback"}]``; an entry without an int index or with non-text fields is dropped."""
    if not isinstance(failures, list):
        return []
    found = []
    for f in failures:
        if isinstance(f, dict) and type(f.get("index")) is int:
            error, text = f.get("error", ""), f.get("traceback", "")
            if isinstance(error, str) and isinstance(text, str):
                found.append(Failure(f["index"], error, text))
    return found


def _writer_gone(run, status, now):
    """Rank 0 writes no status while it prepares, finishes or runs one long serial job, but its lock's heartbeat
    goes on: the newest of the two is its sign of life (the pid decides on the writer's own host)."""
    pid, host = status.get("pid"), status.get("host")
    lock = run.read_lock()
    start = lock.start if lock is not None and (lock.pid, lock.host) == (pid, host) else None
    beats = [t for t in (status.get("updated"), lock and lock.mtime) if isinstance(t, (int, float))]
    return not writer_alive(pid, host, start, max(beats, default=None), STALE_AFTER, now)


class _RecordCount:
    """Counts from the journals by argument digest (headers and checksums only: no payload is held or
    unpickled), recomputed only when a journal's size or mtime changed."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, run):
        paths = run.journal_paths()
        key = []
        for path in paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            key.append((path, st.st_size, st.st_mtime_ns))
        if key != self._key:
            scan = scan_journals([path for path, _size, _mtime in key])
            self._key, self._value = key, (len(scan.ok), scan.failed)
        return self._value


_counts = {}


def read_progress(path, now=None):
    """The model of the run whose output (or ``.mpi`` directory) is ``path``."""
    now = time.time() if now is None else now
    path = os.path.abspath(os.fspath(path))
    output = path[: -len(RUN_SUFFIX)] if path.endswith(RUN_SUFFIX) else path
    run = RunDir(output)
    if not run.exists():
        if os.path.exists(output):
            return _finished(output)
        return Progress(output, MISSING, note=f"no run at {output} (neither the output nor {run.run_dir})")
    status = run.read_status()
    if status is None:
        return _from_records(run, None, now, "no status file yet")
    progress = from_status(status, now)
    progress.output = output
    if progress.state == RUNNING and _writer_gone(run, status, now):
        return _from_records(run, status, now, f"rank 0 (pid {progress.pid} on {progress.host}) "
                                               "stopped updating: the run was killed or its host died")
    return progress


def _from_records(run, status, now, note):
    """When the writer is gone the status may lag: count what the journals hold."""
    done, failed = _counts.setdefault(run.run_dir, _RecordCount()).get(run)
    manifest = run.read_manifest() or {}
    progress = from_status(status, now) if status else Progress(run.output, STALE)
    total = progress.total or _int(manifest, "njobs") or done + len(failed)
    progress.output, progress.total, progress.note = run.output, total, note
    progress.done, progress.failed, progress.running = done, len(failed), 0
    progress.computed = max(progress.done - progress.cached, 0)
    progress.pending = max(total - progress.done - progress.failed, 0)
    progress.state, progress.eta = STALE, None
    progress.ranks = [RankState(r.rank, None, 0, r.done, r.failed) for r in progress.ranks]
    if not progress.failures:
        progress.failures = [_failure_of(rec) for rec in sorted(failed.values(), key=lambda r: r.index)[:20]]
    return progress


def _failure_of(rec):
    """JSON, never a pickle (journal.JobRecord.failure); a damaged record still shows up as a failure."""
    info = rec.failure()
    return Failure(rec.index, info["error"], info["traceback"])


def _finished(output):
    """A finished run: its last status when the run kept one (the notebook magic does), else the job count."""
    meta = RunDir(output).read_meta() or {}
    total = _finished_total(meta)
    status = meta.get("status")
    if isinstance(status, dict) and total is not None and _int(status, "total", None) == total:
        progress = from_status(dict(status, state=FINISHED))
        progress.output, progress.running, progress.eta = output, 0, None
        progress.ranks = [RankState(r.rank, None, 0, r.done, r.failed) for r in progress.ranks]
        return progress
    if total is None:
        return Progress(output, FINISHED, note="output written; its job count is unknown (no job count in "
                                               f"{os.path.basename(output)}{META_SUFFIX})")
    return Progress(output, FINISHED, total=total, done=total, note="output written")


def _finished_total(meta):
    """The job count the run recorded beside its output, or None. The output itself is never opened: it is a
    pickle, and loading a planted one would run its author's code in this reader."""
    return _int(meta, "njobs", None)


def find_runs(root, max_depth=6):
    """Every run under root: ``*.mpi`` directories, plus finished outputs that left a ``.code.json``."""
    found = []
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = dirpath[len(root):].count(os.sep)
        runs = [d for d in dirnames if d.endswith(RUN_SUFFIX)]
        found += [os.path.join(dirpath, d[: -len(RUN_SUFFIX)]) for d in runs]
        found += [os.path.join(dirpath, f[: -len(META_SUFFIX)]) for f in filenames
                  if f.endswith(META_SUFFIX) and f[: -len(META_SUFFIX)] + RUN_SUFFIX
                  not in dirnames]
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in runs and depth < max_depth]
    return sorted(set(found))


def format_duration(seconds):
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def summary_line(p):
    """One line: what a TTY redraws, what a log gets every so often."""
    if p.state == MISSING:
        return f"{p.name}: {p.note}"
    return " | ".join([f"{p.name}: {p.state}", *summary_parts(p)])


def summary_parts(p):
    """The counts, rate and times of a snapshot, as short phrases."""
    parts = [f"{p.done}/{p.total} done"]
    if p.cached:
        parts[-1] += f" ({p.cached} cached)"
    if p.failed:
        parts.append(f"{p.failed} failed")
    if p.state == RUNNING:
        parts += [f"{p.running} running", f"{p.rate:.1f} jobs/s", f"elapsed {format_duration(p.elapsed)}",
                  f"ETA {format_duration(p.eta)}"]
    elif p.elapsed:
        parts.append(f"took {format_duration(p.elapsed)}")
    return parts


def render_text(p):
    """The whole model as text: summary, per-rank table, failures (first line of each)."""
    lines = [summary_line(p)]
    if p.note and p.state != MISSING:
        lines.append(f"  note: {p.note}")
    if p.ranks:
        lines.append("  rank  current job  done  failed")
        for r in p.ranks:
            current = "-" if r.current is None else (f"{r.current}" + (f" (+{r.batch - 1})" if r.batch > 1 else ""))
            lines.append(f"  {r.rank:>4}  {current:>11}  {r.done:>4}  {r.failed:>6}")
    for f in p.failures:
        lines.append(f"  failed job {f.index}: {f.error}")
    return "\n".join(lines)
