"""The MPI loop: rank 0 hands out job indices and keeps the books; workers compute and write their journals.

Every rank already holds the function and the arguments (they run the same script, or received the same closure),
so messages carry only indices and counts. Idle ranks poll with Iprobe and a short sleep instead of blocking:
a blocking receive in MPICH burns most of a core, which on a laptop is the core a worker needed.
Imports neither IPython nor ipyparallel.
"""

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from . import cache as cachemod
from . import errors
from .errors import CodeChanged, JobsFailed, MPITaskerError, UsageError

log = logging.getLogger(__name__)

TAG_TASKS, TAG_REPORT, TAG_STOP, TAG_STOPPED, TAG_FINAL, TAG_FATAL, TAG_SETUP = range(11, 18)
STATUS_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 2.0
TARGET_BATCH_SECONDS = 0.02
PREFETCH_BELOW_SECONDS = 0.05
SHOWN_FAILURES = 20
MAX_TRACEBACK = 4000  # shown in the status file and reports
MAX_TRACEBACK_STORED = 64_000  # kept in a failure record
CODE_CHANGE_POLICIES = ("warn", "reuse", "recompute", "error")
_unfinished_sends = []  # isend requests must outlive the call that made them
_timeout_warned = []


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
    remember_code: bool = False  # check the code fingerprint kept beside the output (the notebook's rule)
    timeout: float | None = None  # seconds a job may run before it is stopped and recorded as failed
    values_everywhere: bool = True  # every rank returns the values (scripts); else only rank 0 (engines)
    monitor: object = None  # called on rank 0 with each status dict written (a text progress view, say)

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
            self.function_name = getattr(self.fn, "__qualname__", type(self.fn).__name__)


@dataclass
class Outcome:
    """What rank 0 tells every rank at the end: values, or the error every rank raises."""

    values: list | None = None
    error_type: str = ""
    message: str = ""
    failures: dict = field(default_factory=dict)
    total: int = 0
    output: str = ""

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

class JobTimedOut(BaseException):
    """Raised inside a job that ran past ``timeout``: a BaseException, so a job's own ``except Exception`` cannot
    swallow it."""


@contextlib.contextmanager
def _time_limit(seconds):
    """SIGALRM after ``seconds`` (main thread only: signals are delivered there). Interrupts Python code and
    blocking calls; a single long call into C (one huge numpy operation) is interrupted when it returns."""
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        if not _timeout_warned:
            _timeout_warned.append(True)
            log.warning("timeout=%g is not applied: jobs run outside the main thread here (a --no-wait run "
                        "in the kernel), where no signal can stop them", seconds)
        yield
        return

    def expire(signum, frame):
        raise JobTimedOut(f"the job ran longer than timeout={seconds:g} s and was stopped")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _safe_str(value):
    """str() of a user object that may itself raise: describing a failure must never fail."""
    try:
        return str(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a broken __str__ may raise anything; say so instead
        return f"<{type(value).__name__}.__str__ raised {type(exc).__name__}>"


def _describe_failure(index, arg, exc, skip_frames):
    """The failure record of a job: a plain dict (error line, traceback text) that never unpickles anything."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    if isinstance(exc, SystemExit):
        error = (f"SystemExit: the job called sys.exit({_safe_str(exc.code)}); raise an exception to report a "
                 "failed job")
    else:
        error = f"{type(exc).__name__}: {_safe_str(exc)}"
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except KeyboardInterrupt:
        raise
    except BaseException as fmt_exc:  # noqa: BLE001 - the error line above still describes the failure
        text = f"{error}\n(the traceback could not be formatted: {type(fmt_exc).__name__})\n"
    return {"index": index, "arg": _short_repr(arg), "error": error, "traceback": text[-MAX_TRACEBACK_STORED:]}


def _short_repr(value, limit=200):
    try:
        text = repr(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a user object's repr must not hide the real failure
        text = f"<{type(value).__name__}: repr failed: {type(exc).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def execute_job(fn, index, arg, timeout=None):
    """Run one job; return (pickled result or None, failure dict or None, seconds).

    Whatever the job raises becomes its failure record, ``SystemExit`` included (a job calling ``sys.exit``
    must not take its rank out of the run). Only ``KeyboardInterrupt`` passes: that is the user stopping the run.
    """
    start = time.perf_counter()
    try:
        with _time_limit(timeout):
            value = fn(arg)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever the job raises becomes its failure record
        return None, _describe_failure(index, arg, exc, skip_frames=1), time.perf_counter() - start
    try:
        payload = cachemod.dumps(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - pickling a user object can raise any type
        wrapped = TypeError(f"the result of type {type(value).__name__} cannot be pickled ({_safe_str(exc)}); "
                            "return plain data (numbers, arrays, dicts) from the job")
        return None, _describe_failure(index, arg, wrapped, skip_frames=0), time.perf_counter() - start
    if len(payload) > cachemod.MAX_RECORD - 64:
        too_large = cachemod.RecordTooLarge(len(payload))
        return None, _describe_failure(index, arg, too_large, skip_frames=0), time.perf_counter() - start
    return payload, None, time.perf_counter() - start


def _run_batch(sweep, indices, journal, rank):
    """Run a batch and journal each job as it ends; return (ok count, failures {index: error line}, seconds)."""
    args, fn = sweep.args, sweep.fn
    start = time.perf_counter()
    ok_count, failures = 0, {}
    journal.start_batch(indices)
    for index in indices:
        arg = args[index]
        payload, failure, seconds = execute_job(fn, index, arg, sweep.timeout)
        if failure is None:
            journal.append(index, True, cachemod.args_digest(arg), seconds, payload)
            ok_count += 1
        else:
            journal.append(index, False, cachemod.args_digest(arg), seconds, cachemod.encode_failure(failure))
            failures[index] = (failure["error"], failure["traceback"][-MAX_TRACEBACK:])
        if sweep.verbose:
            log.info("rank %d: job %d %s in %.3f s", rank, index, "done" if failure is None else "FAILED", seconds)
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
        self._show(self.status(state))

    def _show(self, status):
        """Feed the progress view; a view that breaks (a closed stderr pipe) is dropped, the run goes on."""
        if self.monitor is None:
            return
        try:
            self.monitor(status)
        except Exception as exc:  # noqa: BLE001 - a display must never stop the dispatch of jobs
            self.monitor = None
            log.warning("the progress display failed (%s: %s); the run goes on without it", type(exc).__name__, exc)

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
            self._show(status)
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
    """Rank 0 before any work: reuse the output or the run directory, and list the jobs still to run.

    A started run (its directory holds a manifest or journals) wins over an older output: the output may come
    from other code or arguments, and an interrupted run must resume from its own records, never return the
    output it was replacing.
    """
    cache = cachemod.RunCache(sweep.output)
    cache.check_output_path()
    cachemod.check_picklable(sweep.args)
    if not sweep.fingerprint:
        sweep.fingerprint = cachemod.code_fingerprint(sweep.fn)
    n = len(sweep.args)
    digests = [None] * n
    prepared = _Prepared(cache, digests)
    force = sweep.force
    reusable = {}
    if not force and not _run_started(cache):
        existing = cache.read_output()
        if existing is not None and sweep.remember_code and not _output_code_usable(sweep, cache):
            existing, force = None, True
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
        if force:
            _discard_everything(cache)
        elif _run_started(cache):                # started by another process since we looked: its records win
            reusable = {}
            _check_manifest(sweep, cache)
        _write_manifest(sweep, cache)
        if reusable:                             # copied once: a rerun of this started run ignores the output
            journal = cache.new_journal(0)
            try:
                for index, value in reusable.items():
                    journal.append(index, True, digests[index], 0.0, cachemod.dumps(value))
            finally:
                journal.close()
            reusable = None
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


def _run_started(cache):
    """A run began here and did not finish: it wrote its manifest (or, before format 1's manifest, journals)."""
    return os.path.exists(cache.path(cachemod.MANIFEST)) or bool(cache.journal_paths())


def _discard_everything(cache):
    """``force``: the journals and the old output go before any new work, so nothing of them can come back."""
    if cache.journal_paths() or os.path.exists(cache.output):
        log.warning("force: discarding the cached records in %s and the output %s", cache.run_dir, cache.output)
    cache.discard_records()
    for path in (cache.output, cache.meta_path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise disk_error(cache, "remove the old output of", exc) from exc


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
    """A started run's records are usable for this sweep: format and code checked (the code-change policy)."""
    manifest = cache.read_manifest()
    if manifest is None and cache.journal_paths():
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


def _write_manifest(sweep, cache):
    try:
        cache.write_manifest(len(sweep.args), sweep.fingerprint, sweep.function_name)
    except OSError as exc:
        raise disk_error(cache, "write the manifest of", exc) from exc


def finish(sweep, prepared, ledger):
    """Rank 0 after all work: collect every record, write the output and remove the run directory.

    Each job's first record that matches its argument and loads is used; a record that no longer unpickles is
    passed over for the next one, whatever order the journals' names sort in.
    """
    cache, args, n = prepared.cache, sweep.args, len(sweep.args)
    values, failed, mismatched, unloadable = {}, {}, set(), {}
    for rec in cache.read_records():
        index = rec.index
        if index >= n or index in values:
            continue
        if rec.digest != _digest(prepared.digests, args, index):
            mismatched.add(index)
        elif rec.ok:
            try:
                values[index] = rec.value()
            except Exception as exc:  # noqa: BLE001 - unpickling can raise any type; another record may load
                unloadable[index] = f"{type(exc).__name__}: {exc}"
                continue
            failed.pop(index, None)
            unloadable.pop(index, None)
        elif index not in failed:
            failed[index] = rec.failure()
    for index, error in unloadable.items():
        if index not in values and index not in failed:
            failed[index] = {"index": index, "arg": _short_repr(args[index]), "traceback": "",
                             "error": f"its result was computed but cannot be loaded on rank 0 ({error}); "
                                      "return plain data, or classes importable on every rank"}
    missing = [i for i in range(n) if i not in values and i not in failed]
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
    values = [values[i] for i in range(n)]
    try:
        cache.write_output([(i, [args[i]], values[i]) for i in range(n)])
    except OSError as exc:
        ledger.maybe_write("error", force=True)
        cache.release_lock()
        return Outcome.from_exception(disk_error(cache, "write the output of", exc))
    try:
        # beside every output: its job count and last status for progress views (which never unpickle the
        # output), and its code fingerprint for the notebook's code-change rule
        cache.write_meta(n, sweep.fingerprint, sweep.function_name, ledger.status("finished"))
        cache.remove()
    except OSError as exc:
        log.warning("the output %s is complete, but cleaning up %s failed (%s); delete it by hand",
                    cache.output, cache.run_dir, exc)
    finally:
        cache.release_lock()                     # after the removal: nobody may start in a directory we delete
    ledger.notify_final("finished")
    return Outcome(values=values)


def _failure_outcome(sweep, cache, failed, n):
    indices = sorted(failed)
    first = failed[indices[0]]
    shown = ", ".join(map(str, indices[:50])) + (" ..." if len(indices) > 50 else "")
    message = (f"{len(indices)} of {n} jobs failed: indices {shown}\n"
               f"First failure, job {indices[0]} with argument {first['arg']}: {first['error']}\n"
               f"{first['traceback']}"
               f"The {n - len(indices)} finished jobs are cached in {cache.run_dir}; fix the cause and rerun to "
               "compute only the failed jobs (or pass retries=N to try them again in the same run).")
    failures = {i: failed[i]["traceback"] or failed[i]["error"] for i in indices[:1000]}
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

def run_mpi(sweep, comm, setup_error=None, token=0):
    """Every rank calls this with the same sweep; every rank gets the same values (or the same error).

    ``setup_error``: this rank could not build its sweep (an engine missing a module, say); it still takes part
    until every rank knows, so no rank waits forever for it. ``token`` names the run: ranks that received
    different runs (two kernels sharing engines) find out here instead of exchanging each other's messages.

    The run talks over its own duplicate of ``comm``. It is freed only after a clean end, when every message
    has been received: after an interrupt it is left allocated, because MPI recycles the context of a freed
    communicator and a message still in flight would then reach the next run.
    """
    from mpi4py import MPI

    run_comm = _duplicate(comm)
    _agree_to_start(run_comm, MPI, setup_error, token)
    role = _root if run_comm.rank == 0 else _worker
    outcome = role(sweep, run_comm, MPI)
    run_comm.Free()
    if outcome.values is None:
        outcome.raise_error(on_root=comm.rank == 0)
    return outcome.values


def _agree_to_start(comm, MPI, setup_error, token):
    """One polled allreduce: did every rank set up, and did every rank receive the same run?"""
    from array import array

    mine = array("q", [token, -token, comm.rank if setup_error is not None else comm.size])
    agreed = array("q", [0, 0, 0])
    poll_wait([comm.Iallreduce([mine, MPI.INT64_T], [agreed, MPI.INT64_T], op=MPI.MIN)])
    low, high, failed_rank = agreed[0], -agreed[1], agreed[2]
    if low != high:
        comm.Free()
        raise errors.WorkerError(
            "the MPI ranks received different runs at the same moment (two kernels or clients sending runs to "
            "the same engines at once): each rank stopped before doing anything. Run them one after the other, "
            "or give each notebook its own cluster (%mpicluster start --cluster-id NAME).")
    if failed_rank == comm.size:
        return
    described = None
    if setup_error is not None:
        described = f"{type(setup_error).__name__}: {_safe_str(setup_error)}"
    if comm.rank == failed_rank and comm.rank != 0:
        poll_wait([comm.isend((socket.gethostname(), described), dest=0, tag=TAG_SETUP)])
    elif comm.rank == 0 and failed_rank != 0:
        host, described = _recv_polled(comm, MPI, failed_rank, TAG_SETUP)
        described = f"{described} (on {host})"
    comm.Free()
    if isinstance(setup_error, MPITaskerError) and comm.rank == failed_rank:
        raise setup_error
    raise errors.WorkerError(
        f"MPI rank {failed_rank} could not set up the job, so no rank started it"
        + (f": {described}" if described else "; its own error says why")
        + ". Make what the job needs available on every rank (modules installed in the engines' environment, "
        "the working directory shared) and run again.")


def _recv_polled(comm, MPI, source, tag):
    backoff = Backoff()
    while not comm.Iprobe(source=source, tag=tag):
        backoff.sleep()
    return comm.recv(source=source, tag=tag)


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


def _output_identity(path):
    """What tells the workers they read the very file rank 0 wrote (not a later run's, not a stale cached view)."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _send_final(comm, outcome, skip=()):
    """Tell every worker how the run ended. Values never travel: a worker that needs them reads the output
    file (the run directory already lives on a file system every rank sees), so no rank holds a second copy
    in flight, and an out-of-memory on one rank cannot leave the others waiting in a collective."""
    identity = None
    if outcome.values is not None:
        try:
            identity = _output_identity(outcome.output)
        except OSError as exc:
            outcome = Outcome(error_type="CacheError", message=(
                f"the output {outcome.output} was written but cannot be read back ({exc.strerror}); rerun to "
                "load it"))
    header = Outcome(None, outcome.error_type, outcome.message, outcome.failures, outcome.total, outcome.output)
    poll_wait([comm.isend((header, identity), dest=w, tag=TAG_FINAL) for w in range(1, comm.size) if w not in skip])
    return outcome


def _read_values(sweep, output, identity, attempts=50):
    """A worker's copy of the results, from the output file rank 0 just wrote (checked to be that file)."""
    cache = cachemod.RunCache(output)
    for _attempt in range(attempts):
        try:
            if _output_identity(cache.output) == identity:
                triples = cache.read_output()
                if triples is not None and len(triples) == len(sweep.args) and \
                        all(t[0] == i for i, t in enumerate(triples)):
                    return [t[2] for t in triples]
        except FileNotFoundError:
            pass                                  # a network file system may show the new file a moment later
        time.sleep(0.1)
    raise errors.CacheError(
        f"rank 0 wrote {cache.output}, but this rank cannot read that file (missing, replaced or different): "
        "every rank must see the output's directory. Load the results with pickle on rank 0, or rerun.")


def _root(sweep, comm, MPI):
    try:
        prepared = prepare(sweep)
    except BaseException as exc:
        _send_final(comm, Outcome.from_exception(exc))
        raise
    if prepared.values is not None:
        return _send_final(comm, Outcome(values=prepared.values, output=prepared.cache.output))
    ledger = Ledger(prepared.cache, len(sweep.args), prepared.cached, comm.size - 1, sweep.monitor)
    log.info("%d jobs: %d cached, %d to run on %d workers", len(sweep.args), prepared.cached,
             len(prepared.pending), comm.size - 1)
    gone = set()
    try:
        ledger.maybe_write(force=True)
        fatal = _dispatch(sweep, comm, MPI, prepared.pending, ledger, gone)
        _stop_workers(comm, MPI, gone)
        if fatal:
            ledger.maybe_write("failed", force=True)
            prepared.cache.release_lock()
            outcome = Outcome(error_type="WorkerError", message=(
                f"{fatal}\nThe finished jobs are kept in {prepared.cache.run_dir}; fix the cause and rerun."))
        else:
            outcome = finish(sweep, prepared, ledger)
            outcome.output = prepared.cache.output
        return _send_final(comm, outcome, skip=gone)
    except BaseException as exc:
        _record_stop(ledger, exc)
        prepared.cache.release_lock()
        _abort_workers(comm, exc, gone)
        raise


def _record_stop(ledger, exc):
    """Leave a status that says why the run stopped; the run directory and its records stay."""
    state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
    try:
        ledger.maybe_write(state, force=True)
    except OSError as write_exc:
        log.warning("could not record the %s state: %s", state, write_exc)


def _abort_workers(comm, exc, gone=()):
    """Best effort, never blocking: let workers raise instead of polling forever after rank 0 died."""
    header = Outcome(error_type="WorkerError", message=f"rank 0 stopped with {type(exc).__name__}: {exc}")
    for w in range(1, comm.size):
        if w in gone:
            continue
        try:
            _unfinished_sends.append(comm.isend((header, None), dest=w, tag=TAG_FINAL))
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


def _dispatch(sweep, comm, MPI, pending, ledger, gone):
    """Feed workers until every job has reported; return a fatal worker message, or ''. Workers that left
    the run (interrupted) are added to ``gone``: nobody waits for them any more."""
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
            host, what, left = message
            fatal = fatal or f"rank {source} on {host} " + (
                f"stopped: {what}" if left else f"failed outside of a job: {what}")
            log.error("%s; stopping the run", fatal)
            if left:
                gone.add(source)
            queue.clear()
            outstanding[source].clear()
            ledger.set_current(source, None)
        sends[:] = [req for req in sends if not req.Test()]
        ledger.maybe_write()
    if gone:
        _unfinished_sends.extend(sends)          # a rank that left never receives what was queued for it
    else:
        poll_wait(sends)
    return fatal


def _stop_workers(comm, MPI, gone=()):
    """Workers close (and fsync) their journals before rank 0 reads them: safe on shared file systems."""
    waiting = set(range(1, comm.size)) - set(gone)
    for w in waiting:
        comm.send(None, dest=w, tag=TAG_STOP)
    backoff = Backoff()
    status = MPI.Status()
    while waiting:
        if comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            message = comm.recv(source=source, tag=tag)
            if tag == TAG_STOPPED or (tag == TAG_FATAL and message[2]):
                waiting.discard(source)
            backoff.reset()
        else:
            backoff.sleep()


def _send_polled(comm, MPI, obj, tag):
    """Send to rank 0 without ever blocking on it: if rank 0 aborted the run (FINAL arrives instead of it
    receiving), return that FINAL message and leave the send behind; else None once the send completed."""
    request = comm.isend(obj, dest=0, tag=tag)
    backoff = Backoff()
    while not request.Test():
        if comm.Iprobe(source=0, tag=TAG_FINAL):
            _unfinished_sends.append(request)
            return comm.recv(source=0, tag=TAG_FINAL)
        backoff.sleep()
    return None


def _worker(sweep, comm, MPI):
    try:
        return _worker_loop(sweep, comm, MPI)
    except KeyboardInterrupt:
        # a real interrupt of this rank: rank 0 must not wait for it any more
        _unfinished_sends.append(comm.isend((socket.gethostname(), "interrupted (KeyboardInterrupt)", True),
                                            dest=0, tag=TAG_FATAL))
        raise


def _worker_loop(sweep, comm, MPI):
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
            final = None
            if tag == TAG_TASKS:
                if broken:
                    continue
                try:
                    if journal is None:
                        journal = cache.new_journal(comm.rank)
                    report = _run_batch(sweep, message, journal, comm.rank)
                except Exception as exc:  # noqa: BLE001 - rank 0 must hear of any failure here, or it waits forever
                    broken = True
                    log.error("rank %d cannot continue: %s: %s", comm.rank, type(exc).__name__, exc)
                    final = _send_polled(comm, MPI, (socket.gethostname(), f"{type(exc).__name__}: {exc}", False),
                                         TAG_FATAL)
                else:
                    final = _send_polled(comm, MPI, report, TAG_REPORT)
            elif tag == TAG_STOP:
                if journal is not None:
                    journal.close()
                    journal = None
                final = _send_polled(comm, MPI, None, TAG_STOPPED)
            elif tag == TAG_FINAL:
                final = message
            if final is not None:
                header, identity = final
                if identity is not None and sweep.values_everywhere:
                    header.values = _read_values(sweep, header.output, identity)
                elif identity is not None:
                    header.values = []
                return header
    finally:
        if journal is not None:
            journal.close()
