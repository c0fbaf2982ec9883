"""A worker's side of an MPI run: compute the batches rank 0 sends, journal every job, report the counts.

A worker never blocks on rank 0: it polls for messages, and every send to rank 0 also watches for FINAL, so a
worker whose rank 0 aborted raises the same error instead of waiting forever.
"""

import logging
import socket

from .execution import run_batch, safe_str
from .identity import code_fingerprint
from .protocol import TAG_FATAL, TAG_FINAL, TAG_REPORT, TAG_STOP, TAG_STOPPED, TAG_TASKS, Backoff, abandon, send_to_root
from .rundir import RunDir

log = logging.getLogger(__name__)


def run_worker(sweep, comm, MPI):
    """A worker rank of ``run_mpi``: returns the ``Outcome`` rank 0 sent at the end."""
    try:
        return _work(sweep, comm, MPI)
    except BaseException as exc:
        # this rank leaves the run (a real interrupt, or a failure outside any job): rank 0 must not wait for it
        what = "interrupted (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt) else \
            f"{type(exc).__name__}: {safe_str(exc)}"
        abandon(comm.isend((socket.gethostname(), what, True), dest=0, tag=TAG_FATAL))
        raise


def _work(sweep, comm, MPI):
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
                    final = send_to_root(comm, (socket.gethostname(), f"{type(exc).__name__}: {exc}", False),
                                         TAG_FATAL)
                else:
                    final = send_to_root(comm, report, TAG_REPORT)
            elif tag == TAG_STOP:
                if journal is not None:
                    closing, journal = journal, None
                    try:
                        closing.close()
                    except OSError as exc:       # the last records may not be on disk: rank 0 must say so
                        log.error("rank %d cannot close its journal: %s", comm.rank, exc)
                        what = f"cannot close its journal {closing.path}: {exc}"
                        final = send_to_root(comm, (socket.gethostname(), what, False), TAG_FATAL)
                final = final or send_to_root(comm, None, TAG_STOPPED)
            elif tag == TAG_FINAL:
                final = message
            if final is not None:
                return final
    finally:
        if journal is not None:
            journal.close()
