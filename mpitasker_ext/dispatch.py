"""Rank 0's side of an MPI run: prepare, hand out batches of job indices until every job has reported, stop the
workers, finish, and tell every rank how the run ended.

Every rank already holds the function and the arguments, so messages carry only indices and counts; results never
travel over MPI (they are in the store).
"""

import contextlib
import logging
import math
from collections import deque

from .finish import finish
from .ledger import Ledger
from .protocol import TAG_FATAL, TAG_FINAL, TAG_REPORT, TAG_STOP, TAG_STOPPED, TAG_TASKS, Backoff, abandon, poll_wait
from .reuse import prepare
from .status import FAILED
from .sweep import Outcome

log = logging.getLogger(__name__)

TARGET_BATCH_SECONDS = 0.02
PREFETCH_BELOW_SECONDS = 0.05


def batch_size(seconds_per_job, remaining, nworkers, chunksize=None):
    """Enough jobs to fill ~TARGET_BATCH_SECONDS, but never more than a fair share of what is left."""
    if chunksize:
        return max(1, min(chunksize, remaining))
    if seconds_per_job is None:
        return 1
    size = round(TARGET_BATCH_SECONDS / max(seconds_per_job, 1e-7))
    fair = math.ceil(remaining / (2 * nworkers))
    return max(1, min(size, fair, remaining))


@contextlib.contextmanager
def rank0_run(sweep, nworkers):
    """The skeleton of a run on rank 0, the same for the serial and the MPI loop: ``prepare`` (which takes the
    run's lock), the ledger and its first status, and on every way out the lock released (once the run directory
    is removed, on success) and an error's state recorded. Yields ``(prepared, ledger)``."""
    prepared = prepare(sweep)
    ledger = Ledger(prepared.run, len(sweep.args), prepared.cached, nworkers, sweep.monitor)
    log.info("%d jobs: %d cached, %d to run %s", len(sweep.args), prepared.cached, len(prepared.pending),
             f"on {nworkers} workers" if nworkers else "serially")
    try:
        ledger.maybe_write(force=True)
        yield prepared, ledger
    except BaseException as exc:
        ledger.record_stop(exc)
        raise
    finally:
        prepared.run.release_lock()


def run_rank0(sweep, comm, MPI):
    """Rank 0 of ``run_mpi``: returns the ``Outcome`` every rank was sent, or raises after telling the workers."""
    gone, started = set(), False
    try:
        with rank0_run(sweep, comm.size - 1) as (prepared, ledger):
            started = True
            fatal = _dispatch(sweep, comm, MPI, prepared, ledger, gone)
            fatal = _stop_workers(comm, MPI, gone) or fatal
            if fatal:
                ledger.maybe_write(FAILED, force=True)
                outcome = Outcome(error_type="WorkerError", message=(
                    f"{fatal}\nThe finished jobs are kept in {prepared.run.run_dir}; fix the cause and rerun."))
            else:
                outcome = finish(sweep, prepared, ledger)
    except BaseException as exc:
        if started:                                # workers may be inside a batch: tell them, never block
            _abort_workers(comm, exc, gone)
        else:                                      # nothing was sent yet: every worker waits for this outcome
            _send_final(comm, Outcome.from_exception(exc))
        raise
    return _send_final(comm, outcome, skip=gone)


def _send_final(comm, outcome, skip=()):
    """Tell every worker how the run ended. Results never travel over MPI: they are in the store, on a file
    system every rank sees (as the run directory already is), and each rank reads what it uses when it uses it;
    no collective follows, so one rank running out of memory cannot leave the others waiting."""
    poll_wait([comm.isend(outcome, dest=w, tag=TAG_FINAL) for w in range(1, comm.size) if w not in skip])
    return outcome


def _abort_workers(comm, exc, gone=()):
    """Best effort, never blocking: let workers raise instead of polling forever after rank 0 died."""
    header = Outcome(error_type="WorkerError", message=f"rank 0 stopped with {type(exc).__name__}: {exc}")
    for w in range(1, comm.size):
        if w in gone:
            continue
        try:
            abandon(comm.isend(header, dest=w, tag=TAG_FINAL))
        except Exception as send_exc:  # noqa: BLE001 - best effort while already failing
            log.debug("could not tell rank %d to stop: %s", w, send_exc)


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
        abandon(*sends)                           # a rank that left never receives what was queued for it
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
