"""Views of the progress model: an ipywidgets panel, or text when widgets cannot render.

The choice is made once (``make_view``), so callers never branch: they call ``view.update(progress)`` and
``view.close(progress)``. Both views are pure renderings of ``progress.Progress``; neither reads files (what
feeds them lives in ``follow``).
"""

import html
import os
import sys
import time
import urllib.parse

from . import progress as progressmod
from .status import ERROR, FAILED, FINISHED, INTERRUPTED, MISSING, RUNNING, STALE, STATES

LOG_EVERY_SECONDS = 30.0


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


def make_view(title="", stream=None, output=None):
    """The widget when it can render (with a link to the run's page when ``output`` is given), else the text
    view."""
    if stream is None and widgets_available():
        return ProgressWidget(title, output)
    return TextProgress(stream or sys.stderr)


def run_link_html(output):
    """A link to the run of ``output``: JupyterLab's mpitasker extension opens it in a Lab tab (it handles
    ``a[data-mpitasker-run]``); other front ends follow the href to the server's standalone run page. A kernel knows
    the absolute path but not the server's root, so the href names it absolutely (``mpitasker/open?path=``) and
    the server redirects to the page when the path lies under its root. A path of undecodable bytes gets no link:
    it cannot be put in a URL, and the server lists no such run."""
    path = os.path.abspath(os.fspath(output))
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    base = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")  # set for kernels of a JupyterHub user server
    href = f"{base.rstrip('/')}/mpitasker/open?{urllib.parse.urlencode({'path': path})}"
    return (f"<a class='mpitasker-open' data-mpitasker-run='{_esc(path)}' href='{_esc(href)}' target='_blank' "
            "rel='noopener' title='the run in a JupyterLab tab, or its page on the Jupyter server'>open run</a>")


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


_STATE_COLORS = {RUNNING: "#1976d2", FINISHED: "#2e7d32", FAILED: "#c62828", STALE: "#ef6c00",
                 INTERRUPTED: "#ef6c00", ERROR: "#c62828", MISSING: "#757575"}
assert set(_STATE_COLORS) == set(STATES)
_DONE_COLORS = {**_STATE_COLORS, FAILED: "#2e7d32", ERROR: "#ef6c00"}  # the bar's done part: failures are apart
_FAILED_COLOR = "#c62828"


class ProgressWidget:
    """A bar with counts and rate/ETA, a per-rank table, and failures whose tracebacks open on click."""

    def __init__(self, title="", output=None):
        import ipywidgets as w
        from IPython.display import display

        self._w = w
        link = f" &nbsp;<small>{run_link_html(output)}</small>" if output is not None else ""
        self.title = w.HTML(f"<b>{html.escape(title)}</b>{link}")
        self.bar = w.HTML(bar_html(None), layout=w.Layout(width="35%", min_width="200px"))
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
        self.bar.value = bar_html(progress)
        parts = progressmod.summary_parts(progress)
        self.counts.value = (f"<span class='mpitasker-state' style='color:{color}'><b>"
                             f"{_esc(progress.state)}</b></span> "
                             f"<span class='mpitasker-done' data-done='{_esc(progress.done)}' "
                             f"data-total='{_esc(progress.total)}'>"
                             f"{html.escape(' | '.join(parts))}</span>")
        self.ranks.value = _ranks_table(progress)
        shown = tuple((f.index, f.error, len(f.output)) for f in progress.failures)
        if shown != self._shown_failures:
            self._shown_failures = shown
            w = self._w
            children = [w.HTML(failure_html(f)) for f in progress.failures]
            self.failures.children = children
            for i, f in enumerate(progress.failures):     # a title is set as text (textContent), not as HTML
                self.failures.set_title(i, f"job {f.index}: {f.error}"[:120])

    def close(self, progress):
        self.update(progress)


def failure_html(failure):
    """A failure's entry: its traceback, then the end of what the job printed, both escaped (the model may come
    from a planted journal or status file)."""
    text = f"<pre>{html.escape(failure.traceback or failure.error)}</pre>"
    if failure.output:
        text += (f"<div>output of job {_esc(failure.index)} (last lines):</div>"
                 f"<pre class='mpitasker-output'>{html.escape(failure.output)}</pre>")
    return text


def bar_fractions(progress):
    """The parts of the bar: (done, failed), each a fraction of all jobs, so 3 failed jobs of 180 are a sliver
    of red beside the green, not a red bar."""
    if progress is None:
        return 0.0, 0.0
    if not progress.total:
        return (1.0 if progress.state == FINISHED else 0.0), 0.0
    done = min(max(progress.done / progress.total, 0.0), 1.0)
    return done, min(max(progress.failed / progress.total, 0.0), 1.0 - done)


def bar_html(progress):
    """A bar in two colours, the done part and the failed part side by side, in proportion; any failure stays
    visible (at least 2 px)."""
    done, failed = bar_fractions(progress)
    color = _DONE_COLORS.get(progress.state if progress else RUNNING, _STATE_COLORS[RUNNING])
    failed_style = f"width:{failed * 100:.3f}%;min-width:2px" if failed else "width:0"
    return ("<div class='mpitasker-bar' style='display:flex;height:14px;margin-top:6px;background:#e0e0e0;"
            "border-radius:3px;overflow:hidden'>"
            f"<div class='mpitasker-bar-done' data-fraction='{done:.6f}' "
            f"style='width:{done * 100:.3f}%;background:{color}'></div>"
            f"<div class='mpitasker-bar-failed' data-fraction='{failed:.6f}' "
            f"style='{failed_style};background:{_FAILED_COLOR}'></div></div>")


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
