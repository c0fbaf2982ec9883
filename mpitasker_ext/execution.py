"""Running one job on any rank: its result encoded for the store, or a failure record that says what went wrong
and where (rank and host, as mpi4py tags a remote traceback).

Whatever a job raises is its own failure, ``SystemExit`` included; only ``KeyboardInterrupt`` (the user stopping
the run) passes through. Describing a failure never fails.
"""

import contextlib
import logging
import signal
import socket
import threading
import time
import traceback

from . import journal as journalmod
from .capture import JobOutput
from .identity import args_digest
from .journal import RecordTooLarge, encode_failure
from .payload import encode_value
from .status import MAX_ERROR, MAX_FAILURE_OUTPUT, MAX_TRACEBACK, Failure, job_place

log = logging.getLogger(__name__)

MAX_TRACEBACK_STORED = 64_000  # kept in a failure record
MESSAGE_OUTPUT_LINES = 20  # lines of the first failed job's output that JobsFailed's message shows
_timeout_warned = []


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
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # again every second: a job that catches it still stops
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def safe_str(value):
    """str() of a user object that may itself raise: describing a failure must never fail."""
    try:
        return str(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a broken __str__ may raise anything; say so instead
        return f"<{type(value).__name__}.__str__ raised {type(exc).__name__}>"


def describe_failure(index, arg, exc, skip_frames, rank=0):
    """The failure record of a job: a plain dict (error line, traceback text, the rank and host it ran on) that
    never unpickles anything."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    if isinstance(exc, SystemExit):
        error = (f"SystemExit: the job called sys.exit({safe_str(exc.code)}); raise an exception to report a "
                 "failed job")
    else:
        error = f"{type(exc).__name__}: {safe_str(exc)}"
    if len(error) > MAX_ERROR:           # a message holding a whole data set: the traceback keeps its end
        error = f"{error[:MAX_ERROR]} [... {len(error) - MAX_ERROR} more characters cut]"
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except KeyboardInterrupt:
        raise
    except BaseException as fmt_exc:  # noqa: BLE001 - the error line above still describes the failure
        text = f"{error}\n(the traceback could not be formatted: {type(fmt_exc).__name__})\n"
    return {"index": index, "arg": short_repr(arg), "error": error, "traceback": text[-MAX_TRACEBACK_STORED:],
            "rank": rank, "host": socket.gethostname()}


def failure_place(failure, form="%s"):
    """Where a failure record says its job ran, put in ``form`` ("rank 2 on node7"); '' for a record written
    before records said so."""
    place = job_place(failure.get("rank"), failure.get("host"))
    return form % place if place else ""


def failure_report(failure):
    """A failure record as ``JobsFailed.failures`` holds it: the traceback (or the error line), then where the
    job ran, the way mpi4py tags a traceback from another rank, then the end of what the job printed."""
    text = failure["traceback"] or failure["error"]
    place = failure_place(failure, "(the job ran on %s)\n")
    text = text.rstrip("\n") + "\n" + place if place else text
    output = failure.get("output")
    if output:
        text = text.rstrip("\n") + f"\noutput of job {failure['index']}:\n" + output[-MAX_FAILURE_OUTPUT:]
    return text


def output_lines(failure, count=MESSAGE_OUTPUT_LINES):
    """The last ``count`` lines a failed job printed, under a heading that says so ('' when it printed
    nothing): what an error message shows of it, never more than MAX_FAILURE_OUTPUT characters."""
    output = failure.get("output")
    if not output:
        return ""
    shown = "\n".join(output.splitlines()[-count:])[-MAX_FAILURE_OUTPUT:]
    return f"output of job {failure['index']} (last lines):\n{shown}\n"


def short_repr(value, limit=200):
    try:
        text = repr(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a user object's repr must not hide the real failure
        text = f"<{type(value).__name__}: repr failed: {type(exc).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def execute_job(fn, index, arg, timeout=None, rank=0):
    """Run one job on ``rank`` (rank 0 runs jobs in a serial run, and again when a stored result no longer
    loads); return (encoded result or None, failure dict or None, seconds).

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
        return None, describe_failure(index, arg, exc, skip_frames=1, rank=rank), time.perf_counter() - start
    if timeout and time.perf_counter() - start > timeout:     # it swallowed the stop and finished late
        late = JobTimedOut(f"the job ran longer than timeout={timeout:g} s (it caught the stop and returned "
                           f"after {time.perf_counter() - start:.1f} s)")
        return None, describe_failure(index, arg, late, skip_frames=0, rank=rank), time.perf_counter() - start
    try:
        encoded = encode_value(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - pickling a user object can raise any type
        wrapped = TypeError(f"the result of type {type(value).__name__} cannot be pickled ({safe_str(exc)}); "
                            "return plain data (numbers, arrays, dicts) from the job")
        return None, describe_failure(index, arg, wrapped, skip_frames=0, rank=rank), time.perf_counter() - start
    if encoded.size > journalmod.MAX_RECORD - 64:
        too_large = RecordTooLarge(encoded.size)
        return None, describe_failure(index, arg, too_large, skip_frames=0, rank=rank), time.perf_counter() - start
    return encoded, None, time.perf_counter() - start


def run_batch(sweep, indices, journal, rank):
    """Run a batch and journal each job as it ends, with what it printed (``capture``); return (ok count,
    failures {index: status.Failure} with tracebacks and output cut for the status file, seconds)."""
    args, fn = sweep.args, sweep.fn
    start = time.perf_counter()
    ok_count, failures = 0, {}
    journal.start_batch(indices)
    with JobOutput(echo=sweep.echo_output) as captured:
        for index in indices:
            arg = args[index]
            encoded, failure, seconds = execute_job(fn, index, arg, sweep.timeout, rank)
            output = captured.take()
            if failure is None:
                try:
                    journal.append_value(index, args_digest(arg), seconds, encoded, output)
                    ok_count += 1
                except RecordTooLarge:       # the result fits in a record, but not with what the job printed
                    failure = describe_failure(index, arg, RecordTooLarge(encoded.size + len(output)), 0, rank)
            if failure is not None:
                if output:
                    failure["output"] = output
                journal.append(index, False, args_digest(arg), seconds, encode_failure(failure))
                failures[index] = Failure(index, failure["error"], failure["traceback"][-MAX_TRACEBACK:], rank,
                                          failure["host"], (output or "")[-MAX_FAILURE_OUTPUT:])
            if sweep.verbose:
                log.info("rank %d: job %d %s in %.3f s", rank, index, "done" if failure is None else "FAILED",
                         seconds)
    return ok_count, failures, time.perf_counter() - start
