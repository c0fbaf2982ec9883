"""Rank 0's books of a run, for the serial and the MPI paths alike: counts, each rank's batch, the failures, and
the status file they become (``status.RunStatus``) at most a few times a second."""

import dataclasses
import logging
import os
import socket
import time

from .status import ERROR, INTERRUPTED, RUNNING, SHOWN_FAILURES, RankState, RunStatus

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 2.0
LOG_INTERVAL = 30.0


class Ledger:
    """Counts and per-rank state; turned into the status file at most a few times a second.

    ``monitor`` (a progress view) is called with each ``RunStatus`` written."""

    def __init__(self, run, total, cached, nworkers, monitor=None):
        self.run = run
        self.monitor = monitor
        self.total = total
        self.cached = cached
        self.computed = 0
        self.failed = {}  # job index -> status.Failure, once it has no retry left
        self.attempts = {}
        self.started = time.time()
        self.ranks = {r: RankState(r) for r in range(1 if nworkers else 0, nworkers + 1)}
        self.nworkers = nworkers
        self._last_write = 0.0
        self._last_log = time.monotonic()
        self._dirty = True
        self._status_failed = False

    def running(self):
        """Jobs executing now: one per busy rank (the rest of a rank's batch still counts as pending)."""
        return sum(1 for r in self.ranks.values() if r.current is not None)

    def record(self, rank, ok_count, failures, retries):
        """Book a finished batch (``failures``: {index: status.Failure}); return the failed indices that should
        be tried again."""
        self._dirty = True
        self.computed += ok_count
        info = self.ranks[rank]
        info.done += ok_count
        info.failed += len(failures)
        again = []
        for index, failure in failures.items():
            self.attempts[index] = self.attempts.get(index, 0) + 1
            if self.attempts[index] <= retries:
                again.append(index)
                log.info("job %d failed (%s); retry %d of %d", index, failure.error, self.attempts[index], retries)
            else:
                self.failed[index] = failure
        for index in again:
            self.failed.pop(index, None)
        return again

    def status(self, state):
        """The run as the status file describes it now, in ``state``."""
        now = time.time()
        elapsed = max(now - self.started, 1e-9)
        done = self.cached + self.computed
        running = self.running()
        shown = sorted(self.failed)[:SHOWN_FAILURES]
        return RunStatus(
            state=state, output=self.run.output, total=self.total, done=done, cached=self.cached,
            computed=self.computed, failed=len(self.failed), running=running,
            pending=max(self.total - done - len(self.failed) - running, 0), rate=self.computed / elapsed,
            started=self.started, updated=now, host=socket.gethostname(), pid=os.getpid(), workers=self.nworkers,
            ranks=tuple(dataclasses.replace(r) for r in self.ranks.values()),
            failures=tuple(self.failed[i] for i in shown))

    def set_current(self, rank, batch):
        info = self.ranks[rank]
        info.current, info.batch = (batch[0], len(batch)) if batch else (None, 0)
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

    def maybe_write(self, state=RUNNING, force=False):
        """Rewrite the status when something changed (<= 4/s), and as a heartbeat every 2 s regardless."""
        now = time.monotonic()
        since = now - self._last_write
        status = None
        if force or (self._dirty and since >= STATUS_INTERVAL) or since >= HEARTBEAT_INTERVAL:
            self._last_write = now
            self._dirty = False
            status = self.status(state)
            try:
                self.run.write_status(status.to_json())
            except OSError as exc:
                if not self._status_failed:
                    log.warning("cannot write the status file in %s (%s); the run goes on, progress views "
                                "will lag", self.run.run_dir, exc.strerror)
                self._status_failed = True
            self._show(status)
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            status = status or self.status(state)
            log.info("%d/%d jobs done (%d cached), %d failed, %.1f jobs/s", status.done, self.total,
                     self.cached, status.failed, status.rate)

    def record_stop(self, exc):
        """Leave a status that says why the run stopped; the run directory and its records stay."""
        state = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else ERROR
        try:
            self.maybe_write(state, force=True)
        except OSError as write_exc:
            log.warning("could not record the %s state: %s", state, write_exc)
