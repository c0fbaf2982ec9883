"""The status model of a run, read from its ``.mpi`` directory only: no MPI, no kernel, any process.

Every view (widget, text line, CLI, server page) renders this one model. A refresh reads the status file rank 0
rewrites (its size depends on the ranks, not the jobs; its format is ``status``'s); only when that writer is gone
are the journals counted, and that count is cached until a journal changes.

Nothing here unpickles, and every field read from a file is type-checked: anyone who can write under a shared
project directory can plant a run there, and reading it must neither run their code nor pass their markup on.
"""

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field

from .lock import writer_alive
from .rundir import META_SUFFIX, RUN_SUFFIX, RunDir
from .scan import scan_journals
from .status import (
    FINISHED,
    MAX_FAILURE_OUTPUT,
    MISSING,
    RUNNING,
    SHOWN_FAILURES,
    STALE,
    Failure,
    RunStatus,
    int_field,
)

STALE_AFTER = 10.0  # seconds without a heartbeat (status or lock, each every 2 s) before a remote writer is gone


@dataclass
class Progress:
    """One snapshot of a run. ``state`` is one of ``status.STATES``: running, finished, failed, error,
    interrupted, stale (its writer is gone) or missing (nothing there). ``ranks`` holds ``status.RankState``,
    ``failures`` ``status.Failure``."""

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
    """The model of a ``status.RunStatus``: rank 0's own (its live text view) or a status file's JSON object,
    which is read through ``RunStatus.from_json`` (every field type-checked: the file may be planted, and this
    must never raise or pass it on)."""
    now = time.time() if now is None else now
    if not isinstance(status, RunStatus):
        status = RunStatus.from_json(status)
    started, updated = status.started, status.updated
    end = now if status.state == RUNNING else updated
    elapsed = max(end - started, 0.0) if started and end is not None else 0.0
    progress = Progress(
        output=status.output, state=status.state, total=status.total, done=status.done, cached=status.cached,
        computed=status.computed, running=status.running, failed=status.failed, pending=status.pending,
        rate=status.rate, elapsed=elapsed, started=started, updated=updated, host=status.host, pid=status.pid,
        ranks=list(status.ranks), failures=list(status.failures))
    remaining = progress.total - progress.done - progress.failed
    if progress.state == RUNNING and progress.rate > 0 and remaining > 0:
        progress.eta = remaining / progress.rate
    return progress


def _writer_gone(run, status, now):
    """Rank 0 writes no status while it prepares, finishes or runs one long serial job, but its lock's heartbeat
    goes on: the newest of the two is its sign of life (the pid decides on the writer's own host)."""
    lock = run.read_lock()
    start = lock.start if lock is not None and (lock.pid, lock.host) == (status.pid, status.host) else None
    beats = [t for t in (status.updated, lock and lock.mtime) if isinstance(t, (int, float))]
    return not writer_alive(status.pid, status.host, start, max(beats, default=None), STALE_AFTER, now)


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
    data = run.read_status()
    if data is None:
        return _from_records(run, None, now, "no status file yet")
    status = RunStatus.from_json(data)
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
    total = progress.total or int_field(manifest, "njobs") or done + len(failed)
    progress.output, progress.total, progress.note = run.output, total, note
    progress.done, progress.failed, progress.running = done, len(failed), 0
    progress.computed = max(progress.done - progress.cached, 0)
    progress.pending = max(total - progress.done - progress.failed, 0)
    progress.state, progress.eta = STALE, None
    progress.ranks = [_idle(r) for r in progress.ranks]
    if not progress.failures:
        shown = sorted(failed.values(), key=lambda r: r.index)[:SHOWN_FAILURES]
        progress.failures = [_failure_of(rec) for rec in shown]
    return progress


def _idle(rank):
    """A rank's line once nothing runs any more: its counts stay."""
    return dataclasses.replace(rank, current=None, batch=0)


def _failure_of(rec):
    """JSON, never a pickle (journal.JobRecord.failure); a damaged record still shows up as a failure, and one
    written before records said where the job ran shows no place."""
    info = rec.failure()
    return Failure(rec.index, info["error"], info["traceback"], info.get("rank"), info.get("host", ""),
                   info.get("output", "")[-MAX_FAILURE_OUTPUT:])


def _finished(output):
    """A finished run: its last status when the run kept one (the notebook magic does), else the job count."""
    meta = RunDir(output).read_meta() or {}
    total = _finished_total(meta)
    status = meta.get("status")
    if isinstance(status, dict) and total is not None and int_field(status, "total", None) == total:
        progress = from_status(dataclasses.replace(RunStatus.from_json(status), state=FINISHED))
        progress.output, progress.running, progress.eta = output, 0, None
        progress.ranks = [_idle(r) for r in progress.ranks]
        return progress
    if total is None:
        return Progress(output, FINISHED, note="output written; its job count is unknown (no job count in "
                                               f"{os.path.basename(output)}{META_SUFFIX})")
    return Progress(output, FINISHED, total=total, done=total, note="output written")


def _finished_total(meta):
    """The job count the run recorded beside its output, or None. The output itself is never opened: it is a
    pickle, and loading a planted one would run its author's code in this reader."""
    return int_field(meta, "njobs", None)


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


TEXT_OUTPUT_LINES = 5  # lines of a failed job's output the text rendering shows under its error


def render_text(p):
    """The whole model as text: summary, per-rank table, failures (the error line of each, and the last lines
    the job printed)."""
    lines = [summary_line(p)]
    if p.note and p.state != MISSING:
        lines.append(f"  note: {p.note}")
    if p.ranks:
        lines.append("  rank  current job  done  failed")
        for r in p.ranks:
            current = "-" if r.current is None else (f"{r.current}" + (f" (+{r.batch - 1})" if r.batch > 1 else ""))
            lines.append(f"  {r.rank:>4}  {current:>11}  {r.done:>4}  {r.failed:>6}")
    for f in p.failures:
        lines.append(f"  failed job {f.index}" + (f" ({f.place})" if f.place else "") + f": {f.error}")
        if f.output:
            lines.append(f"    output of job {f.index} (last lines):")
            lines += [f"    | {line}" for line in f.output.splitlines()[-TEXT_OUTPUT_LINES:]]
    return "\n".join(lines)
