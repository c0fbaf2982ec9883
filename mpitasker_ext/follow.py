"""Keep a view of a run up to date: from the run directory (``Follower``: the magic while it waits, %mpistatus)
or from the status rank 0 writes (``StatusMonitor``: a script's stderr line, a serial run in the kernel).

Both redraw at most every ``REFRESH_SECONDS``, so the cost of following does not depend on the number of jobs,
and draw the final state once.
"""

import os
import threading
import time

from . import progress as progressmod
from .status import MISSING, RUNNING
from .views import make_view

REFRESH_SECONDS = 0.5  # <= 2 Hz
FOLLOW_SLACK = 3.0  # seconds a run's host clock may lag the kernel's before its run looks older than `since`


class StatusMonitor:
    """Called on rank 0 with each status dict the scheduler writes; redraws ``view`` at most every
    ``min_interval`` seconds while the run goes on, and closes it with every final state."""

    def __init__(self, view, min_interval=REFRESH_SECONDS):
        self.view = view
        self.min_interval = min_interval
        self._last = None

    def __call__(self, status):
        progress = progressmod.from_status(status)
        if progress.state != RUNNING:
            self.view.close(progress)
            return
        now = time.monotonic()
        if self._last is None or now - self._last >= self.min_interval:
            self._last = now
            self.view.update(progress)


class Follower:
    """Refresh a view from a run directory at <= 2 Hz until the run is no longer running (or stop()).

    ``since`` (wall-clock time the run was submitted) and ``earlier`` (``earlier_run()`` read before that):
    snapshots of an earlier run on the same output, which the directory still shows until the new run writes
    its status, are not drawn and do not end the view."""

    def __init__(self, output, view, background=False, since=None, earlier=None):
        self.output = output
        self.view = view
        self.since = since
        self.earlier = earlier
        self._stop = threading.Event()
        self._closed = threading.Lock()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self.follow, name="mpitasker-progress", daemon=True)
            self._thread.start()

    def refresh(self):
        """Redraw from the run directory; nothing is drawn until the run has started."""
        snapshot = progressmod.read_progress(self.output)
        if self._ours(snapshot):
            self.view.update(snapshot)
        return snapshot

    def follow(self):
        while not self._stop.is_set():
            snapshot = progressmod.read_progress(self.output)
            if self._ours(snapshot):
                if snapshot.state != RUNNING:
                    self._close(snapshot)
                    return
                self.view.update(snapshot)
            self._stop.wait(REFRESH_SECONDS)

    def _ours(self, snapshot):
        """Drawable, and of the followed run (not what an earlier run left there)."""
        return started_since(snapshot, self.since, self.earlier)

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._close(progressmod.read_progress(self.output))

    def _close(self, snapshot):
        """The final state, drawn once; none for a run that never started (a code-change question, a run
        locked by another process): the snapshot then shows an earlier or another run, not this one."""
        if self._ours(snapshot) and self._closed.acquire(blocking=False):
            self.view.close(snapshot)


def earlier_run(output):
    """When the run the output shows now started (None: no run), read before a new run is submitted: the
    clocks' slack lets a run started just before ``since`` pass for the new one, this does not."""
    return progressmod.read_progress(output).started


def started_since(snapshot, since, earlier=None):
    """Whether ``snapshot`` shows a run started at ``since`` or later (any run, without ``since``) other than
    the ``earlier`` one: until the new run writes its first status, the directory still shows the previous one,
    whose results a --force or a code change is about to discard."""
    if snapshot.state == MISSING:
        return False
    if earlier is not None and snapshot.started == earlier:
        return False
    if since is None:
        return True
    return snapshot.started is not None and snapshot.started >= since - FOLLOW_SLACK


def follow_run(path):
    """For %mpistatus: a live view of one run (the widget in a kernel, text elsewhere)."""
    return Follower(path, make_view(os.path.basename(os.fspath(path)), output=path), background=True)
