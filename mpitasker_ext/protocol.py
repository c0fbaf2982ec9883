"""The pieces of the MPI protocol both sides use: message tags, waiting without spinning, the start agreement.

Idle ranks poll with Iprobe and a short sleep instead of blocking: a blocking receive in MPICH burns most of a
core, which on a laptop is the core a worker needed, and it ignores Ctrl-C. Every wait here is polled.
"""

import socket
import time

from . import errors
from .errors import MPITaskerError
from .execution import safe_str

TAG_TASKS, TAG_REPORT, TAG_STOP, TAG_STOPPED, TAG_FINAL, TAG_FATAL, TAG_SETUP = range(11, 18)
_abandoned_sends = []  # isend requests must outlive the call that made them


class Backoff:
    """Sleep a little longer each idle poll, up to tmax; reset when something arrives.

    Once a rank has waited a while, the cap grows with the wait (``latency_share`` of it, up to ``tmax_idle``):
    the answer it is waiting for comes at most 1% later than it could, and a long wait costs about a hundred
    wake-ups a second instead of a thousand.
    """

    def __init__(self, tmax=0.001, tmax_idle=0.008, latency_share=0.01):
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


def abandon(*requests):
    """Leave sends nobody may ever receive (the run is ending) without blocking on them; the requests are kept
    referenced, since their buffers must stay alive while MPI may still read them."""
    _abandoned_sends.extend(requests)


def poll_wait(requests):
    """Wait for MPI requests without a blocking call (which spins in MPICH and ignores Ctrl-C)."""
    backoff = Backoff()
    pending = list(requests)
    while pending:
        pending = [req for req in pending if not req.Test()]
        if pending:
            backoff.sleep()


def recv_polled(comm, source, tag):
    backoff = Backoff()
    while not comm.Iprobe(source=source, tag=tag):
        backoff.sleep()
    return comm.recv(source=source, tag=tag)


def send_to_root(comm, obj, tag):
    """Send to rank 0 without ever blocking on it: if rank 0 aborted the run (FINAL arrives instead of it
    receiving), return that FINAL message and leave the send behind; else None once the send completed."""
    request = comm.isend(obj, dest=0, tag=tag)
    backoff = Backoff()
    while not request.Test():
        if comm.Iprobe(source=0, tag=TAG_FINAL):
            abandon(request)
            return comm.recv(source=0, tag=TAG_FINAL)
        backoff.sleep()
    return None


def duplicate(comm):
    """A nonblocking Idup polled with backoff: interruptible, and no rank spins while others arrive."""
    try:
        new_comm, request = comm.Idup()
    except (AttributeError, NotImplementedError):
        return comm.Dup()
    poll_wait([request])
    return new_comm


def agree_to_start(comm, MPI, setup_error, token):
    """One polled allreduce: did every rank set up, and did every rank receive the same run? Returns when they
    did; otherwise frees ``comm`` and raises the same error on every rank."""
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
        host, described = recv_polled(comm, failed_rank, TAG_SETUP)
        described = f"{described} (on {host})"
    comm.Free()
    if isinstance(setup_error, MPITaskerError) and comm.rank == failed_rank:
        raise setup_error
    raise errors.WorkerError(
        f"MPI rank {failed_rank} could not set up the job, so no rank started it"
        + (f": {described}" if described else "; its own error says why")
        + ". Make what the job needs available on every rank (modules installed in the engines' environment, "
        "the working directory shared) and run again.")
