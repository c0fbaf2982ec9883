"""Views of the progress model: an ipywidgets panel, or text when widgets cannot render.

The choice is made once (``make_view``), so callers never branch: they call ``view.update(progress)`` and
``view.close(progress)``. Both views are pure renderings of ``progress.Progress``; neither reads files.
"""

import html
import logging
import os
import sys
import threading
import time

from . import progress as progressmod

log = logging.getLogger(__name__)

REFRESH_SECONDS = 0.5  # <= 2 Hz
LOG_EVERY_SECONDS = 30.0
FOLLOW_SLACK = 3.0  # seconds a run's host clock may lag the kernel's before its run looks older than `since`


def widgets_available():
    """True inside a Jupyter kernel with ipywidgets importable (a front end may still not render them)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or not hasattr(shell, "kernel"):
            return False
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def make_view(title="", stream=None):
    """The widget when it can render, else the text view."""
    if stream is None and widgets_available():
        return ProgressWidget(title)
    return TextProgress(stream or sys.stderr)


class TextProgress:
    """One updating line on a TTY; otherwise a line every LOG_EVERY_SECONDS (never a line per job)."""

    def __init__(self, stream=None, every=LOG_EVERY_SECONDS):
        self.stream = stream or sys.stderr
        self.every = every
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._width = 0

    def update(self, progress):
        now = time.monotonic()
        line = progressmod.summary_line(progress)
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
            self.stream.flush()
        elif now - self._last >= self.every:
            self._last = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self, progress):
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(progressmod.render_text(progress) + "\n")
        self.stream.flush()


class StatusMonitor:
    """Rank 0's own text view in script mode: fed each status dict the scheduler writes."""

    def __init__(self, stream=None, every=LOG_EVERY_SECONDS):
        self.view = TextProgress(stream, every)

    def __call__(self, status):
        progress = progressmod.from_status(status)
        if progress.state == progressmod.RUNNING:
            self.view.update(progress)
        else:
            self.view.close(progress)


_STATE_COLORS = {"running": "#1976d2", "finished": "#2e7d32", "failed": "#c62828", "stale": "#ef6c00",
                 "interrupted": "#ef6c00", "error": "#c62828", "missing": "#757575"}


class ProgressWidget:
    """A bar with counts and rate/ETA, a per-rank table, and failures whose tracebacks open on click."""

    def __init__(self, title=""):
        import ipywidgets as w
        from IPython.display import display

        self._w = w
        self.title = w.HTML(f"<b>{html.escape(title)}</b>")
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(width="35%", min_width="200px"))
        self.counts = w.HTML()
        self.counts.add_class("mpitasker-counts")
        self.ranks = w.HTML()
        self.ranks.add_class("mpitasker-ranks")
        self.failures = w.Accordion(children=[])
        self.failures.add_class("mpitasker-failures")
        self._shown_failures = ()
        self.box = w.VBox([self.title, w.HBox([self.bar, self.counts]), self.ranks, self.failures])
        self.box.add_class("mpitasker-progress")
        display(self.box)

    def update(self, progress):
        color = _STATE_COLORS.get(progress.state, "#1976d2")
        self.bar.value = progress.fraction
        self.bar.style.bar_color = color
        parts = progressmod.summary_parts(progress)
        self.counts.value = (f"<span class='mpitasker-state' style='color:{color}'><b>"
                             f"{_esc(progress.state)}</b></span> "
                             f"<span class='mpitasker-done' data-done='{_esc(progress.done)}' "
                             f"data-total='{_esc(progress.total)}'>"
                             f"{html.escape(' | '.join(parts))}</span>")
        self.ranks.value = _ranks_table(progress)
        shown = tuple((f.index, f.error) for f in progress.failures)
        if shown != self._shown_failures:
            self._shown_failures = shown
            w = self._w
            children = [w.HTML(f"<pre>{html.escape(f.traceback or f.error)}</pre>") for f in progress.failures]
            self.failures.children = children
            for i, f in enumerate(progress.failures):     # a title is set as text (textContent), not as HTML
                self.failures.set_title(i, f"job {f.index}: {f.error}"[:120])

    def close(self, progress):
        self.update(progress)


def _esc(value):
    """Any value bound for HTML, numbers included: the model may come from a planted status file."""
    return html.escape(str(value), quote=True)


def _ranks_table(progress):
    if not progress.ranks:
        return ""
    rows = "".join(
        f"<tr><td>{_esc(r.rank)}</td><td>{_esc('-' if r.current is None else r.current)}"
        f"{_esc(f' (+{r.batch - 1})') if isinstance(r.batch, int) and r.batch > 1 else ''}</td>"
        f"<td>{_esc(r.done)}</td><td>{_esc(r.failed)}</td></tr>"
        for r in progress.ranks)
    return ("<table style='font-size:90%'><tr><th>rank</th><th>current job</th><th>done</th><th>failed</th></tr>"
            f"{rows}</table>")


class Follower:
    """Refresh a view from a run directory at <= 2 Hz until the run is no longer running (or stop()).

    ``since`` (wall-clock time the run was submitted): snapshots of an earlier run on the same output, which
    the directory still shows until the new run writes its status, are not drawn and do not end the view."""

    def __init__(self, output, view, background=False, since=None):
        self.output = output
        self.view = view
        self.since = since
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
                if snapshot.state != progressmod.RUNNING:
                    self._close(snapshot)
                    return
                self.view.update(snapshot)
            self._stop.wait(REFRESH_SECONDS)

    def _ours(self, snapshot):
        """Drawable, and of the followed run (not what an earlier run left there)."""
        if snapshot.state == progressmod.MISSING:
            return False
        if self.since is None:
            return True
        return snapshot.started is not None and snapshot.started >= self.since - FOLLOW_SLACK

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._close(progressmod.read_progress(self.output))

    def _close(self, snapshot):
        """The final state, drawn once."""
        if snapshot.state != progressmod.MISSING and self._closed.acquire(blocking=False):
            self.view.close(snapshot)


def status_view_for(path):
    """For %mpistatus: a live view of one run (the widget in a kernel, text elsewhere)."""
    return Follower(path, make_view(os.path.basename(os.fspath(path))), background=True)
