"""The MPI loop: rank 0 hands out job indices and keeps the books; workers compute and write their journals.

Every rank already holds the function and the arguments (they run the same script, or received the same closure),
so messages carry only indices and counts. Idle ranks poll with Iprobe and a short sleep instead of blocking:
a blocking receive in MPICH burns most of a core, which on a laptop is the core a worker needed. What is reused
and how a run ends live in ``reuse``; running one job in ``execution``. Imports neither IPython nor ipyparallel.
"""

import logging
import math
import os
import socket
import time
from collections import deque

from . import errors
from .errors import MPITaskerError
from .execution import MAX_TRACEBACK, run_batch, safe_str
from .finish import finish
from .identity import code_fingerprint
from .journal import FORMAT_VERSION
from .reuse import disk_error, prepare
from .rundir import RunDir
from .sweep import CODE_CHANGE_POLICIES, Outcome, Sweep

__all__ = ["Backoff", "Ledger", "Sweep", "Outcome", "CODE_CHANGE_POLICIES", "run_serial", "run_mpi", "batch_size",
           "MAX_TRACEBACK"]

log = logging.getLogger(__name__)

TAG_TASKS, TAG_REPORT, TAG_STOP, TAG_STOPPED, TAG_FINAL, TAG_FATAL, TAG_SETUP = range(11, 18)
STATUS_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 2.0
TARGET_BATCH_SECONDS = 0.02
PREFETCH_BELOW_SECONDS = 0.05
SHOWN_FAILURES = 20
_unfinished_sends = []  # isend requests must outlive the call that made them


class Backoff:
    """Sleep a little longer each idle poll, up to tmax; reset when something arrives.

    Once a rank has waited a while, the cap grows with the wait (``latency_share`` of it, up to ``tmax_idle``):
    the answer it is waiting for comes at most 0.4% later than it could, and a long wait costs a few hundred
    wake-ups a second instead of a thousand.
    """

    def __init__(self, tmax=0.001, tmax_idle=0.008, latency_share=0.004):
        self.tmax = tmax
        self.tmax_idle = tmax_idle
        self.latency_share = latency_share
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
            else:
                cap = min(self.tmax_idle, max(self.tmax, (now - self._idle_since) * self.latency_share))
        self.tval = min(cap, max(self.tmin, self.tval * 2))


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
            "format": FORMAT_VERSION, "state": state, "output": self.cache.output,
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


# -- serial path -------------------------------------------------------------------------------------------------

def run_serial(sweep):
    """All jobs in this process, with the same store, resume and failure rules as the MPI path. The results
    stay on disk: read them with ``results.Results``."""
    prepared = prepare(sweep)
    ledger = Ledger(prepared.run, len(sweep.args), prepared.cached, 0, sweep.monitor)
    log.info("%d jobs: %d cached, %d to run serially", len(sweep.args), prepared.cached, len(prepared.pending))
    try:
        ledger.maybe_write(force=True)
        queue, prepared.pending = deque(prepared.pending), None     # the jobs' indices go as they run
        journal = prepared.run.new_journal(0, code=prepared.fingerprint) if queue else None
        try:
            while queue:
                index = queue.popleft()
                ledger.set_current(0, [index])
                try:
                    ok_count, failures, _ = run_batch(sweep, [index], journal, 0)
                except OSError as exc:
                    raise disk_error(prepared.run, "journal a job of", exc) from exc
                ledger.set_current(0, None)
                queue.extend(ledger.record(0, ok_count, failures, sweep.retries))
                ledger.maybe_write()
        finally:
            if journal is not None:
                journal.close()
        outcome = finish(sweep, prepared, ledger)
    except BaseException as exc:
        _record_stop(ledger, exc)
        prepared.run.release_lock()
        raise
    if not outcome.ok:
        outcome.raise_error(on_root=True)


# -- MPI path ----------------------------------------------------------------------------------------------------

def run_mpi(sweep, comm, setup_error=None, token=0):
    """Every rank calls this with the same sweep; on every rank it returns when the results are in the store
    (read them with ``results.Results``), or raises the same error.

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
    if not outcome.ok:
        outcome.raise_error(on_root=comm.rank == 0)


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
        described = f"{type(setup_error).__name__}: {safe_str(setup_error)}"
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


def _send_final(comm, outcome, skip=()):
    """Tell every worker how the run ended. Results never travel over MPI: they are in the store, on a file
    system every rank sees (as the run directory already is), and each rank reads what it uses when it uses it;
    no collective follows, so one rank running out of memory cannot leave the others waiting."""
    poll_wait([comm.isend(outcome, dest=w, tag=TAG_FINAL) for w in range(1, comm.size) if w not in skip])
    return outcome


def _root(sweep, comm, MPI):
    try:
        prepared = prepare(sweep)
    except BaseException as exc:
        _send_final(comm, Outcome.from_exception(exc))
        raise
    ledger = Ledger(prepared.run, len(sweep.args), prepared.cached, comm.size - 1, sweep.monitor)
    log.info("%d jobs: %d cached, %d to run on %d workers", len(sweep.args), prepared.cached,
             len(prepared.pending), comm.size - 1)
    gone = set()
    try:
        ledger.maybe_write(force=True)
        fatal = _dispatch(sweep, comm, MPI, prepared, ledger, gone)
        fatal = _stop_workers(comm, MPI, gone) or fatal
        if fatal:
            ledger.maybe_write("failed", force=True)
            prepared.run.release_lock()
            outcome = Outcome(error_type="WorkerError", message=(
                f"{fatal}\nThe finished jobs are kept in {prepared.run.run_dir}; fix the cause and rerun."))
        else:
            outcome = finish(sweep, prepared, ledger)
        return _send_final(comm, outcome, skip=gone)
    except BaseException as exc:
        _record_stop(ledger, exc)
        prepared.run.release_lock()
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
            _unfinished_sends.append(comm.isend(header, dest=w, tag=TAG_FINAL))
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


def _dispatch(sweep, comm, MPI, prepared, ledger, gone):
    """Feed workers until every job has reported; return a fatal worker message, or ''. Workers that left
    the run (interrupted) are added to ``gone``: nobody waits for them any more."""
    workers = list(range(1, comm.size))
    queue, prepared.pending = deque(prepared.pending), None     # the jobs' indices go as they run
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


def _stop_workers(comm, MPI, gone):
    """Workers close (and fsync) their journals before rank 0 reads them: safe on shared file systems. Returns
    what went wrong on a worker meanwhile ('' if nothing); a worker that leaves is added to ``gone``."""
    waiting = set(range(1, comm.size)) - gone
    for w in waiting:
        comm.send(None, dest=w, tag=TAG_STOP)
    backoff = Backoff()
    status = MPI.Status()
    fatal = ""
    while waiting:
        if comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            message = comm.recv(source=source, tag=tag)
            if tag == TAG_FATAL:
                host, what, left = message
                fatal = fatal or f"rank {source} on {host} failed while stopping: {what}"
                if left:
                    gone.add(source)
                    waiting.discard(source)
            elif tag == TAG_STOPPED:
                waiting.discard(source)
            backoff.reset()
        else:
            backoff.sleep()
    return fatal


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
    except BaseException as exc:
        # this rank leaves the run (a real interrupt, or a failure outside any job): rank 0 must not wait for it
        what = "interrupted (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt) else \
            f"{type(exc).__name__}: {safe_str(exc)}"
        _unfinished_sends.append(comm.isend((socket.gethostname(), what, True), dest=0, tag=TAG_FATAL))
        raise


def _worker_loop(sweep, comm, MPI):
    run = RunDir(sweep.output)
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
                        code = sweep.fingerprint or code_fingerprint(sweep.fn)
                        journal = run.new_journal(comm.rank, code=code)
                    report = run_batch(sweep, message, journal, comm.rank)
                except Exception as exc:  # noqa: BLE001 - rank 0 must hear of any failure here, or it waits forever
                    broken = True
                    log.error("rank %d cannot continue: %s: %s", comm.rank, type(exc).__name__, exc)
                    final = _send_polled(comm, MPI, (socket.gethostname(), f"{type(exc).__name__}: {exc}", False),
                                         TAG_FATAL)
                else:
                    final = _send_polled(comm, MPI, report, TAG_REPORT)
            elif tag == TAG_STOP:
                if journal is not None:
                    closing, journal = journal, None
                    try:
                        closing.close()
                    except OSError as exc:       # the last records may not be on disk: rank 0 must say so
                        log.error("rank %d cannot close its journal: %s", comm.rank, exc)
                        what = f"cannot close its journal {closing.path}: {exc}"
                        final = _send_polled(comm, MPI, (socket.gethostname(), what, False), TAG_FATAL)
                final = final or _send_polled(comm, MPI, None, TAG_STOPPED)
            elif tag == TAG_FINAL:
                final = message
            if final is not None:
                return final
    finally:
        if journal is not None:
            journal.close()
