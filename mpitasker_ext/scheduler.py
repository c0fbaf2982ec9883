"""The MPI loop: rank 0 hands out job indices and keeps the books; workers compute and write their journals.

Every rank already holds the function and the arguments (they run the same script, or received the same closure),
so messages carry only indices and counts. Idle ranks poll with Iprobe and a short sleep instead of blocking:
a blocking receive in MPICH burns most of a core, which on a laptop is the core a worker needed.
Imports neither IPython nor ipyparallel.
"""

import logging
import math
import os
import pickle
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from . import cache as cachemod
from . import errors
from .errors import CodeChanged, JobsFailed, MPITaskerError, UsageError

log = logging.getLogger(__name__)

TAG_TASKS, TAG_REPORT, TAG_STOP, TAG_STOPPED, TAG_FINAL, TAG_FATAL = range(11, 17)
STATUS_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 2.0
TARGET_BATCH_SECONDS = 0.02
PREFETCH_BELOW_SECONDS = 0.05
SHOWN_FAILURES = 20
MAX_TRACEBACK = 4000
CODE_CHANGE_POLICIES = ("warn", "reuse", "recompute", "error")
_unfinished_aborts = []  # isend requests must outlive the call that made them


class Backoff:
    """Sleep a little longer each idle poll, up to tmax; reset when something arrives.

    After ``relax_after`` seconds without news the cap rises to ``tmax_idle``: a rank that has waited that
    long loses at most 0.4% of the wait in latency, and its wake-ups cost a third of the CPU.
    """

    def __init__(self, tmax=0.001, tmax_idle=0.004, relax_after=1.0):
        self.tmax = tmax
        self.tmax_idle = tmax_idle
        self.relax_after = relax_after
        self.tmin = tmax / 1024
        self.tval = 0.0
        self._idle_since = None

    def reset(self):
        self.tval = 0.0
        self._idle_since = None

    def sleep(self):
        time.sleep(self.tval)
        cap = self.tmax
        if self.tval >= self.tmax:
            now = time.monotonic()
            if self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since > self.relax_after:
                cap = self.tmax_idle
        self.tval = min(cap, max(self.tmin, self.tval * 2))


@dataclass
class Sweep:
    """Everything a rank needs to take part in one map: identical on every rank."""

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
    remember_code: bool = False  # keep the code fingerprint beside the output, to catch changes after success
    monitor: object = None  # called on rank 0 with each status dict written (a text progress view, say)

    def __post_init__(self):
        if self.on_code_change not in CODE_CHANGE_POLICIES:
            raise UsageError(f"on_code_change={self.on_code_change!r} is not one of {CODE_CHANGE_POLICIES}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise UsageError(f"retries={self.retries!r} must be a whole number >= 0")
        if self.chunksize is not None and (not isinstance(self.chunksize, int) or self.chunksize < 1):
            raise UsageError(f"chunksize={self.chunksize!r} must be a whole number >= 1 (or None to adapt)")
        if not callable(self.fn):
            raise UsageError(f"the job function must be callable, got {type(self.fn).__name__}")
        if not self.function_name:
            self.function_name = getattr(self.fn, "__qualname__", type(self.fn).__name__)


@dataclass
class Outcome:
    """What rank 0 tells every rank at the end: values, or the error every rank raises."""

    values: list | None = None
    error_type: str = ""
    message: str = ""
    failures: dict = field(default_factory=dict)
    total: int = 0

    @classmethod
    def from_exception(cls, exc):
        if isinstance(exc, errors.MPITaskerError):
            return cls(error_type=type(exc).__name__, message=str(exc))
        return cls(error_type="MPITaskerError", message=f"rank 0 could not run the map: {exc}")

    def raise_error(self, on_root):
        """Rank 0 shows the whole story; the other ranks a one-line version of the same error."""
        if self.error_type == "JobsFailed":
            message = self.message if on_root else self.message.split("\n", 1)[0] + " (rank 0 shows the traceback)"
            raise JobsFailed(message, self.failures, total=self.total)
        kind = getattr(errors, self.error_type, None)
        if not (isinstance(kind, type) and issubclass(kind, errors.MPITaskerError)):
            kind = errors.MPITaskerError
        raise kind(self.message)


# -- job execution (any rank) ----------------------------------------------------------------------------------

def _failure_payload(index, arg, exc, skip_frames):
    tb = exc.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return pickle.dumps({"index": index, "arg": _short_repr(arg), "error": f"{type(exc).__name__}: {exc}",
                         "traceback": text})


def _short_repr(value, limit=200):
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a user object's repr must not hide the real failure
        text = f"<{type(value).__name__}: repr failed: {exc}>"
    return text if len(text) <= limit else text[:limit] + "..."


def execute_job(fn, index, arg):
    """Run one job; return (ok, payload bytes, seconds). Job errors become records, not exceptions."""
    start = time.perf_counter()
    try:
        value = fn(arg)
    except Exception as exc:  # noqa: BLE001 - whatever the job raises becomes its failure record
        return False, _failure_payload(index, arg, exc, skip_frames=1), time.perf_counter() - start
    try:
        payload = cachemod.dumps(value)
    except Exception as exc:  # noqa: BLE001 - pickling a user object can raise any type
        wrapped = TypeError(f"the result of type {type(value).__name__} cannot be pickled ({exc}); "
                            "return plain data (numbers, arrays, dicts) from the job")
        return False, _failure_payload(index, arg, wrapped, skip_frames=0), time.perf_counter() - start
    if len(payload) > cachemod.MAX_RECORD - 64:
        too_large = cachemod.RecordTooLarge(len(payload))
        return False, _failure_payload(index, arg, too_large, skip_frames=0), time.perf_counter() - start
    return True, payload, time.perf_counter() - start


def _run_batch(sweep, indices, journal, rank):
    """Run a batch and journal each job as it ends; return (ok count, failures {index: error line}, seconds)."""
    args, fn = sweep.args, sweep.fn
    start = time.perf_counter()
    ok_count, failures = 0, {}
    journal.start_batch(indices)
    for index in indices:
        arg = args[index]
        ok, payload, seconds = execute_job(fn, index, arg)
        journal.append(index, ok, cachemod.args_digest(arg), seconds, payload)
        if ok:
            ok_count += 1
        else:
            info = pickle.loads(payload)
            failures[index] = (info["error"], info["traceback"][-MAX_TRACEBACK:])
        if sweep.verbose:
            log.info("rank %d: job %d %s in %.3f s", rank, index, "done" if ok else "FAILED", seconds)
    return ok_count, failures, time.perf_counter() - start


# -- rank-0 bookkeeping shared by the serial and the MPI paths ---------------------------------------------------

class Ledger:
    """Counts and per-rank state; turned into the status file at most a few times a second."""

    def __init__(self, cache, total, cached, nworkers, monitor=None):
        self.cache = cache
        self.monitor = monitor
        self.total = total
        self.cached = cached
        self.computed = 0
        self.failed = {}
        self.attempts = {}
        self.started = time.time()
        self.ranks = {r: {"current": None, "done": 0, "failed": 0} for r in range(1 if nworkers else 0,
                                                                                nworkers + 1)}
        self.nworkers = nworkers
        self._last_write = 0.0
        self._last_log = time.monotonic()
        self._dirty = True
        self._status_failed = False

    def running(self):
        """Jobs executing now: one per busy rank (the rest of a rank's batch still counts as pending)."""
        return sum(1 for r in self.ranks.values() if r["current"])

    def record(self, rank, ok_count, failures, retries):
        """Book a finished batch; return the failed indices that should be tried again."""
        self._dirty = True
        self.computed += ok_count
        info = self.ranks[rank]
        info["done"] += ok_count
        info["failed"] += len(failures)
        again = []
        for index, failure in failures.items():
            self.attempts[index] = self.attempts.get(index, 0) + 1
            if self.attempts[index] <= retries:
                again.append(index)
                log.info("job %d failed (%s); retry %d of %d", index, failure[0], self.attempts[index], retries)
            else:
                self.failed[index] = failure
        for index in again:
            self.failed.pop(index, None)
        return again

    def status(self, state):
        now = time.time()
        elapsed = max(now - self.started, 1e-9)
        done = self.cached + self.computed
        running = self.running()
        shown = sorted(self.failed)[:SHOWN_FAILURES]
        return {
            "format": cachemod.FORMAT_VERSION, "state": state, "output": self.cache.output,
            "total": self.total, "done": done, "cached": self.cached, "computed": self.computed,
            "failed": len(self.failed), "running": running,
            "pending": max(self.total - done - len(self.failed) - running, 0),
            "rate": self.computed / elapsed, "started": self.started, "updated": now,
            "host": socket.gethostname(), "pid": os.getpid(), "workers": self.nworkers,
            "ranks": {str(r): dict(v) for r, v in self.ranks.items()},
            "failures": [{"index": i, "error": self.failed[i][0], "traceback": self.failed[i][1]} for i in shown],
        }

    def set_current(self, rank, batch):
        self.ranks[rank]["current"] = [batch[0], len(batch)] if batch else None
        self._dirty = True

    def notify_final(self, state):
        """Tell the monitor how the run ended, when no status file will say it (the directory is gone)."""
        if self.monitor is not None:
            self.monitor(self.status(state))

    def maybe_write(self, state="running", force=False):
        """Rewrite the status when something changed (<= 4/s), and as a heartbeat every 2 s regardless."""
        now = time.monotonic()
        since = now - self._last_write
        status = None
        if force or (self._dirty and since >= STATUS_INTERVAL) or since >= HEARTBEAT_INTERVAL:
            self._last_write = now
            self._dirty = False
            status = self.status(state)
            try:
                self.cache.write_status(status)
            except OSError as exc:
                if not self._status_failed:
                    log.warning("cannot write the status file in %s (%s); the run goes on, progress views "
                                "will lag", self.cache.run_dir, exc.strerror)
                self._status_failed = True
            if self.monitor is not None:
                self.monitor(status)
        if now - self._last_log >= 30.0:
            self._last_log = now
            status = status or self.status(state)
            log.info("%d/%d jobs done (%d cached), %d failed, %.1f jobs/s", status["done"], self.total,
                     self.cached, status["failed"], status["rate"])


@dataclass
class _Prepared:
    cache: cachemod.RunCache
    digests: list
    pending: list = field(default_factory=list)
    cached: int = 0
    values: list | None = None


def _digest(prepared_digests, args, index):
    d = prepared_digests[index]
    if d is None:
        d = prepared_digests[index] = cachemod.args_digest(args[index])
    return d


def prepare(sweep):
    """Rank 0 before any work: reuse the output or the run directory, and list the jobs still to run."""
    cache = cachemod.RunCache(sweep.output)
    cache.check_output_path()
    cachemod.check_picklable(sweep.args)
    if not sweep.fingerprint:
        sweep.fingerprint = cachemod.code_fingerprint(sweep.fn)
    n = len(sweep.args)
    digests = [None] * n
    prepared = _Prepared(cache, digests)
    reusable = {}
    if not sweep.force:
        existing = cache.read_output()
        if existing is not None and sweep.remember_code and not _output_code_usable(sweep, cache):
            existing = None
            sweep.force = True
        if existing is not None:
            for index, arg_list, value in existing:
                if isinstance(index, int) and 0 <= index < n and \
                        cachemod.args_digest(arg_list[0]) == _digest(digests, sweep.args, index):
                    reusable[index] = value
            if len(reusable) == n and len(existing) == n:
                log.info("%s exists with the same %d arguments; returning it", cache.output, n)
                prepared.values = [reusable[i] for i in range(n)]
                return prepared
            log.warning("%s exists but %d of its %d jobs have other arguments than now; reusing the %d that "
                        "match and computing the rest", cache.output, n - len(reusable), n, len(reusable))
    cache.create()
    cache.acquire_lock()
    try:
        _check_manifest(sweep, cache)
        if reusable:
            journal = cache.new_journal(0)
            try:
                for index, value in reusable.items():
                    journal.append(index, True, digests[index], 0.0, cachemod.dumps(value))
            finally:
                journal.close()
        done, changed, interrupted = set(), 0, []
        for info, records in cache.read_journals():
            for rec in records:
                if rec.ok and rec.index < n and rec.index not in done:
                    if rec.digest != _digest(digests, sweep.args, rec.index):
                        changed += 1
                    elif _loadable(rec):
                        done.add(rec.index)
            if info.in_flight is not None:             # known once its records are read
                interrupted.append(info)
        _report_interrupted([info for info in interrupted if info.in_flight not in done], sweep.args)
        if changed:
            log.warning("%d cached records were made for other arguments than now; recomputing those jobs", changed)
        prepared.cached = len(done)
        prepared.pending = [i for i in range(n) if i not in done]
    except BaseException:
        cache.release_lock()
        raise
    return prepared


def _report_interrupted(interrupted, args):
    """Say which jobs were running when earlier runs died: the one that kills its process is among them."""
    if not interrupted:
        return
    shown = ", ".join(f"job {i.in_flight} (rank {i.rank}, pid {i.pid} on {i.host})" for i in interrupted[-8:])
    log.warning("an earlier run stopped while these jobs were running: %s; they run again now", shown)
    deaths = {}
    for info in interrupted:
        deaths[info.in_flight] = deaths.get(info.in_flight, 0) + 1
    for index, count in sorted(deaths.items()):
        if count >= 2 and index < len(args):
            log.warning("job %d was running each of the %d times a process of this sweep died: it probably kills "
                        "its own process (os._exit, a segfault, running out of memory). Its argument is %s; try "
                        "it alone with fn(args[%d]).", index, count, _short_repr(args[index]), index)


def _loadable(rec):
    """A record whose result no longer unpickles (a renamed class, say) is recomputed, not a crash at the end."""
    try:
        rec.value()
    except Exception as exc:  # noqa: BLE001 - unpickling can raise any type
        log.warning("the cached result of job %d cannot be loaded (%s: %s); recomputing it", rec.index,
                    type(exc).__name__, exc)
        return False
    return True


def _code_change(sweep, what):
    """Apply the on_code_change policy; True when cached results may be used."""
    policy = sweep.on_code_change
    if policy == "error":
        raise CodeChanged(f"{what}. Choose: recompute everything (force / --force) or keep the cached "
                          "results (reuse / --reuse).")
    if policy == "recompute":
        log.warning("%s; recomputing, as asked (on_code_change='recompute')", what)
        return False
    if policy == "warn":
        log.warning("%s; reusing the cached results. Pass force=True (or delete them) to recompute.", what)
    return True


def _output_code_usable(sweep, cache):
    meta = cache.read_meta()
    if meta is None or meta.get("code") == sweep.fingerprint:
        return True
    return _code_change(sweep, f"the code that made {cache.output} differs from the code now")


def _check_manifest(sweep, cache):
    manifest = cache.read_manifest()
    if sweep.force:
        if cache.journal_paths():
            log.warning("force: discarding the cached records in %s", cache.run_dir)
        cache.discard_records()
    elif manifest is None and cache.journal_paths():
        log.warning("%s has records but no readable manifest; records are still checked job by job",
                    cache.run_dir)
    elif manifest is not None and manifest.get("format") != cachemod.FORMAT_VERSION:
        log.warning("%s was written by cache format %s, this is format %d; its records will be recomputed",
                    cache.run_dir, manifest.get("format"), cachemod.FORMAT_VERSION)
    elif manifest is not None and manifest.get("code") != sweep.fingerprint and cache.journal_paths():
        what = (f"the job function's code changed since {cache.run_dir} was written "
                f"(function {manifest.get('function')!r} then, {sweep.function_name!r} now)")
        if not _code_change(sweep, what):
            cache.discard_records()
    try:
        cache.write_manifest(len(sweep.args), sweep.fingerprint, sweep.function_name)
    except OSError as exc:
        raise disk_error(cache, "write the manifest of", exc) from exc


def finish(sweep, prepared, ledger):
    """Rank 0 after all work: collect every record, write the output and remove the run directory."""
    cache, args, n = prepared.cache, sweep.args, len(sweep.args)
    best, failed, mismatched = {}, {}, set()
    for rec in cache.read_records():
        if rec.index >= n or rec.index in best:
            continue
        if rec.digest != _digest(prepared.digests, args, rec.index):
            mismatched.add(rec.index)
        elif rec.ok:
            best[rec.index] = rec
            failed.pop(rec.index, None)
        else:
            failed[rec.index] = rec
    missing = [i for i in range(n) if i not in best and i not in failed]
    if failed or missing:
        ledger.maybe_write("failed", force=True)
        cache.release_lock()
        if failed:
            return _failure_outcome(sweep, cache, failed, n)
        if mismatched.intersection(missing):
            return Outcome(error_type="UsageError", message=(
                f"the arguments of {len(missing)} jobs (e.g. job {missing[0]}) differ between ranks: every "
                "rank must build the same list of arguments (seed random generators; do not depend on the "
                "rank or the time). Finished records are kept in " + cache.run_dir))
        return Outcome(error_type="WorkerError", message=(
            f"{len(missing)} jobs (e.g. {missing[:10]}) have no record although they were scheduled; a "
            f"worker may have lost its journal. Rerun to compute them; finished work is kept in {cache.run_dir}"))
    values = [best[i].value() for i in range(n)]
    try:
        cache.write_output([(i, [args[i]], values[i]) for i in range(n)])
    except OSError as exc:
        ledger.maybe_write("error", force=True)
        cache.release_lock()
        return Outcome.from_exception(disk_error(cache, "write the output of", exc))
    try:
        if sweep.remember_code:
            cache.write_meta(n, sweep.fingerprint, sweep.function_name, ledger.status("finished"))
        cache.remove()
    except OSError as exc:
        log.warning("the output %s is complete, but cleaning up %s failed (%s); delete it by hand",
                    cache.output, cache.run_dir, exc)
    ledger.notify_final("finished")
    return Outcome(values=values)


def _failure_outcome(sweep, cache, failed, n):
    indices = sorted(failed)
    first = failed[indices[0]].value()
    shown = ", ".join(map(str, indices[:50])) + (" ..." if len(indices) > 50 else "")
    message = (f"{len(indices)} of {n} jobs failed: indices {shown}\n"
               f"First failure, job {indices[0]} with argument {first['arg']}:\n{first['traceback']}"
               f"The {n - len(indices)} finished jobs are cached in {cache.run_dir}; fix the cause and rerun to "
               "compute only the failed jobs (or pass retries=N to try them again in the same run).")
    failures = {i: failed[i].value()["traceback"] for i in indices[:1000]}
    return Outcome(error_type="JobsFailed", message=message, failures=failures, total=n)


# -- serial path -------------------------------------------------------------------------------------------------

def disk_error(cache, what, exc):
    """An I/O failure as users need to read it: what failed, why, and that finished work is safe."""
    return errors.CacheError(
        f"cannot {what} {cache.output}: {exc.strerror or exc} ({getattr(exc, 'filename', '') or cache.run_dir}). "
        f"Every finished job is kept in {cache.run_dir}; fix the cause (free disk space, permissions) and rerun: "
        "finished jobs are not computed again.")


def run_serial(sweep):
    """All jobs in this process, with the same cache, resume and failure rules as the MPI path."""
    prepared = prepare(sweep)
    if prepared.values is not None:
        return prepared.values
    ledger = Ledger(prepared.cache, len(sweep.args), prepared.cached, 0, sweep.monitor)
    log.info("%d jobs: %d cached, %d to run serially", len(sweep.args), prepared.cached, len(prepared.pending))
    try:
        ledger.maybe_write(force=True)
        queue = deque(prepared.pending)
        journal = prepared.cache.new_journal(0) if queue else None
        try:
            while queue:
                index = queue.popleft()
                ledger.set_current(0, [index])
                try:
                    ok_count, failures, _ = _run_batch(sweep, [index], journal, 0)
                except OSError as exc:
                    raise disk_error(prepared.cache, "journal a job of", exc) from exc
                ledger.set_current(0, None)
                queue.extend(ledger.record(0, ok_count, failures, sweep.retries))
                ledger.maybe_write()
        finally:
            if journal is not None:
                journal.close()
        outcome = finish(sweep, prepared, ledger)
    except BaseException as exc:
        _record_stop(ledger, exc)
        prepared.cache.release_lock()
        raise
    if outcome.values is None:
        outcome.raise_error(on_root=True)
    return outcome.values


# -- MPI path ----------------------------------------------------------------------------------------------------

def run_mpi(sweep, comm):
    """Every rank calls this with the same sweep; every rank gets the same values (or the same error).

    The run talks over its own duplicate of ``comm``. It is freed only after a clean end, when every message
    has been received: after an interrupt it is left allocated, because MPI recycles the context of a freed
    communicator and a message still in flight would then reach the next run.
    """
    from mpi4py import MPI

    run_comm = _duplicate(comm)
    role = _root if run_comm.rank == 0 else _worker
    outcome = role(sweep, run_comm, MPI)
    run_comm.Free()
    if outcome.values is None:
        outcome.raise_error(on_root=comm.rank == 0)
    return outcome.values


def _duplicate(comm):
    """A nonblocking Idup polled with backoff: interruptible, and no rank spins while others arrive."""
    try:
        new_comm, request = comm.Idup()
    except (AttributeError, NotImplementedError):
        return comm.Dup()
    poll_wait([request])
    return new_comm


def poll_wait(requests):
    """Wait for MPI requests without a blocking call (which spins in MPICH and ignores Ctrl-C)."""
    backoff = Backoff()
    pending = list(requests)
    while pending:
        pending = [req for req in pending if not req.Test()]
        if pending:
            backoff.sleep()


BCAST_CHUNK = 1 << 30


def _broadcast_bytes(comm, MPI, data):
    """Ibcast in chunks (MPI counts are 32-bit), polled; ``data`` is the buffer to fill on the workers."""
    view = memoryview(data)
    for start in range(0, len(view), BCAST_CHUNK):
        poll_wait([comm.Ibcast([view[start:start + BCAST_CHUNK], MPI.BYTE], root=0)])
    return data


def _send_final(comm, outcome):
    """Tell every worker the result; the pickled values then go out in one polled broadcast."""
    from mpi4py import MPI

    data = None if outcome.values is None else cachemod.dumps(outcome.values)
    header = Outcome(None, outcome.error_type, outcome.message, outcome.failures, outcome.total)
    poll_wait([comm.isend((header, None if data is None else len(data)), dest=w, tag=TAG_FINAL)
               for w in range(1, comm.size)])
    if data is not None:
        _broadcast_bytes(comm, MPI, data)


def _root(sweep, comm, MPI):
    try:
        prepared = prepare(sweep)
    except BaseException as exc:
        _send_final(comm, Outcome.from_exception(exc))
        raise
    if prepared.values is not None:
        outcome = Outcome(values=prepared.values)
        _send_final(comm, outcome)
        return outcome
    ledger = Ledger(prepared.cache, len(sweep.args), prepared.cached, comm.size - 1, sweep.monitor)
    log.info("%d jobs: %d cached, %d to run on %d workers", len(sweep.args), prepared.cached,
             len(prepared.pending), comm.size - 1)
    try:
        ledger.maybe_write(force=True)
        fatal = _dispatch(sweep, comm, MPI, prepared.pending, ledger)
        _stop_workers(comm, MPI)
        if fatal:
            ledger.maybe_write("failed", force=True)
            prepared.cache.release_lock()
            outcome = Outcome(error_type="WorkerError", message=(
                f"{fatal}\nThe finished jobs are kept in {prepared.cache.run_dir}; fix the cause and rerun."))
        else:
            outcome = finish(sweep, prepared, ledger)
    except BaseException as exc:
        _record_stop(ledger, exc)
        prepared.cache.release_lock()
        _abort_workers(comm, exc)
        raise
    _send_final(comm, outcome)
    return outcome


def _record_stop(ledger, exc):
    """Leave a status that says why the run stopped; the run directory and its records stay."""
    state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
    try:
        ledger.maybe_write(state, force=True)
    except OSError as write_exc:
        log.warning("could not record the %s state: %s", state, write_exc)


def _abort_workers(comm, exc):
    """Best effort, never blocking: let workers raise instead of polling forever after rank 0 died."""
    header = Outcome(error_type="WorkerError", message=f"rank 0 stopped with {type(exc).__name__}: {exc}")
    for w in range(1, comm.size):
        try:
            _unfinished_aborts.append(comm.isend((header, None), dest=w, tag=TAG_FINAL))
        except Exception as send_exc:  # noqa: BLE001 - best effort while already failing
            log.debug("could not tell rank %d to stop: %s", w, send_exc)


def batch_size(seconds_per_job, remaining, nworkers, chunksize=None):
    """Enough jobs to fill ~TARGET_BATCH_SECONDS, but never more than a fair share of what is left."""
    if chunksize:
        return max(1, min(chunksize, remaining))
    if seconds_per_job is None:
        return 1
    size = round(TARGET_BATCH_SECONDS / max(seconds_per_job, 1e-7))
    fair = math.ceil(remaining / (2 * nworkers))
    return max(1, min(size, fair, remaining))


def _dispatch(sweep, comm, MPI, pending, ledger):
    """Feed workers until every job has reported; return a fatal worker message, or ''."""
    workers = list(range(1, comm.size))
    queue = deque(pending)
    outstanding = {w: deque() for w in workers}
    per_job = None
    fatal = ""
    backoff = Backoff()
    status = MPI.Status()

    sends = []

    def feed(worker):
        """Keep one batch queued behind the running one when batches are short, so no worker waits on us."""
        while queue and not fatal:
            size = batch_size(per_job, len(queue), len(workers), sweep.chunksize)
            depth = 2 if per_job is not None and per_job * size < PREFETCH_BELOW_SECONDS else 1
            if len(outstanding[worker]) >= depth:
                return
            batch = [queue.popleft() for _ in range(size)]
            sends.append(comm.isend(batch, dest=worker, tag=TAG_TASKS))
            outstanding[worker].append(batch)
            if len(outstanding[worker]) == 1:
                ledger.set_current(worker, batch)

    for w in workers:
        feed(w)
    while any(outstanding.values()):
        if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            backoff.sleep()
            ledger.maybe_write()
            continue
        backoff.reset()
        source, tag = status.Get_source(), status.Get_tag()
        message = comm.recv(source=source, tag=tag)
        if tag == TAG_REPORT:
            ok_count, failures, seconds = message
            batch = outstanding[source].popleft()
            measured = seconds / len(batch)
            per_job = measured if per_job is None else 0.7 * per_job + 0.3 * measured
            queue.extend(ledger.record(source, ok_count, failures, sweep.retries))
            ledger.set_current(source, outstanding[source][0] if outstanding[source] else None)
            feed(source)
        elif tag == TAG_FATAL:
            fatal = f"rank {source} on {message[0]} failed outside of a job: {message[1]}"
            log.error("%s; stopping the run", fatal)
            queue.clear()
            outstanding[source].clear()
            ledger.set_current(source, None)
        sends[:] = [req for req in sends if not req.Test()]
        ledger.maybe_write()
    poll_wait(sends)
    return fatal


def _stop_workers(comm, MPI):
    """Workers close (and fsync) their journals before rank 0 reads them: safe on shared file systems."""
    for w in range(1, comm.size):
        comm.send(None, dest=w, tag=TAG_STOP)
    waiting = set(range(1, comm.size))
    backoff = Backoff()
    status = MPI.Status()
    while waiting:
        if comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_STOPPED, status=status):
            comm.recv(source=status.Get_source(), tag=TAG_STOPPED)
            waiting.discard(status.Get_source())
            backoff.reset()
        else:
            backoff.sleep()


def _worker(sweep, comm, MPI):
    cache = cachemod.RunCache(sweep.output)
    journal = None
    broken = False
    backoff = Backoff()
    status = MPI.Status()
    try:
        while True:
            if not comm.Iprobe(source=0, tag=MPI.ANY_TAG, status=status):
                backoff.sleep()
                continue
            backoff.reset()
            tag = status.Get_tag()
            message = comm.recv(source=0, tag=tag)
            if tag == TAG_TASKS:
                if broken:
                    continue
                try:
                    if journal is None:
                        journal = cache.new_journal(comm.rank)
                    report = _run_batch(sweep, message, journal, comm.rank)
                except (OSError, MPITaskerError) as exc:
                    broken = True
                    log.error("rank %d cannot continue: %s", comm.rank, exc)
                    comm.send((socket.gethostname(), f"{type(exc).__name__}: {exc}"), dest=0, tag=TAG_FATAL)
                    continue
                comm.send(report, dest=0, tag=TAG_REPORT)
            elif tag == TAG_STOP:
                if journal is not None:
                    journal.close()
                    journal = None
                comm.send(None, dest=0, tag=TAG_STOPPED)
            elif tag == TAG_FINAL:
                header, size = message
                if size is not None:
                    header.values = pickle.loads(_broadcast_bytes(comm, MPI, bytearray(size)))
                return header
    finally:
        if journal is not None:
            journal.close()
