"""The entry points of a run: ``run_serial`` (every job in this process) and ``run_mpi`` (rank 0 dispatches, the
other ranks work), with the same store, resume and failure rules.

The loops live apart: rank 0's in ``dispatch``, the workers' in ``worker``, the protocol both share in
``protocol``, rank 0's books in ``ledger``. What is reused and how a run ends live in ``reuse``; running one job in
``execution``. Imports neither IPython nor ipyparallel.
"""

import logging
from collections import deque

from .dispatch import rank0_run, run_rank0
from .execution import run_batch
from .finish import finish
from .protocol import agree_to_start, duplicate
from .reuse import disk_error
from .worker import run_worker

__all__ = ["run_serial", "run_mpi"]

log = logging.getLogger(__name__)


def run_serial(sweep):
    """All jobs in this process, with the same store, resume and failure rules as the MPI path. The results
    stay on disk: read them with ``results.Results``."""
    with rank0_run(sweep, 0) as (prepared, ledger):
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
    if not outcome.ok:
        outcome.raise_error(on_root=True)


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

    run_comm = duplicate(comm)
    agree_to_start(run_comm, MPI, setup_error, token)
    role = run_rank0 if run_comm.rank == 0 else run_worker
    outcome = role(sweep, run_comm, MPI)
    run_comm.Free()
    if not outcome.ok:
        outcome.raise_error(on_root=comm.rank == 0)

