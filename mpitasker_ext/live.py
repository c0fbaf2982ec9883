"""The finished part of a run while it goes on, read in the kernel: ``MapRun.partial()`` and ``--live FUNC``.

A sweep is something people watch take shape (a resonance curve filling in), not only count. This reads what the
run directory and the store hold so far and never writes: results are matched to jobs by argument digest, as the
reuse rules match them, so the results an earlier run left (the store, an interrupted run) serve the jobs they
hold from the first refresh, and each refresh reads only the frames appended since the last one.

Only ok records are unpickled, and only those of the kernel's own sweep (the digest must be one of its
arguments'): these are the results the kernel reads at the end anyway.
"""

import logging
import os
import time

from .identity import args_digests
from .payload import read_value
from .rundir import RunDir
from .scan import read_appended
from .store import ResultStore

log = logging.getLogger(__name__)

LIVE_INTERVAL = 1.0  # seconds between calls of a --live function: drawing a figure costs more than reading


class LiveResults:
    """What is finished of the sweep ``args`` on ``output``, refreshed incrementally.

    ``refresh()`` reads new records and returns how many jobs gained a result; ``finished()`` gives
    ``(indices, args, values)`` of the finished jobs in job order."""

    def __init__(self, output, args):
        self.output = os.fspath(output)
        self.args = args
        self._jobs = None  # digest -> job indices, computed on the first refresh (hashing the arguments once)
        self._values = {}
        self._read_to = {}  # journal path -> (device, inode, offset read up to)
        self._run = RunDir(self.output)
        self._store = ResultStore(self.output)

    def _jobs_by_digest(self):
        if self._jobs is None:
            jobs = {}
            for index, digest in enumerate(args_digests(self.args)):
                jobs.setdefault(digest, []).append(index)
            self._jobs = jobs
        return self._jobs

    def refresh(self):
        """Read what was appended since the last refresh; return the number of jobs that gained a result."""
        jobs = self._jobs_by_digest()
        gained = 0
        for path in self._store.journal_paths() + self._run.journal_paths():
            try:
                gained += self._read_journal(path, jobs)
            except FileNotFoundError:
                self._read_to.pop(path, None)  # moved into the store at the end of the run: read there
            except OSError as exc:
                log.debug("live results: %s unreadable now (%s); tried again next refresh", path, exc)
        return gained

    def _read_journal(self, path, jobs):
        st = os.stat(path)
        device, inode, start = self._read_to.get(path, (st.st_dev, st.st_ino, 0))
        if (device, inode) != (st.st_dev, st.st_ino):
            start = 0  # another file under the same name (compacted): read it anew
        if start >= st.st_size:
            return 0
        records, read_to = read_appended(path, start)
        gained = 0
        for _index, digest, location in records:
            waiting = [i for i in jobs.get(digest, ()) if i not in self._values]
            if not waiting:
                continue
            try:
                value = read_value(location)
            except (OSError, MemoryError):
                raise                      # passing trouble: read again from `start` at the next refresh
            except Exception as exc:  # noqa: BLE001 - unpickling a stored result can raise any type
                # A result that does not load (a renamed class, damage, a journal moved into the store since):
                # rank 0 sets it aside and computes it again, and that record is read when it arrives.
                log.info("live results: job %d's result at byte %d of %s is not shown (%s: %s)", waiting[0],
                         location.offset, path, type(exc).__name__, exc)
                continue
            for index in waiting:
                self._values[index] = value
            gained += len(waiting)
        self._read_to[path] = (st.st_dev, st.st_ino, read_to)
        return gained

    def __len__(self):
        return len(self._values)

    def finished(self):
        """``(indices, args, values)`` of the jobs finished so far, in job order."""
        indices = sorted(self._values)
        return indices, [self.args[i] for i in indices], [self._values[i] for i in indices]


class LiveView:
    """A progress view that also calls ``func(args, values)`` with the finished part of the run, at most once per
    ``interval`` while it goes on (only when something new arrived), in whatever thread draws the view: the
    magic's own loop while it waits, so a figure updates in place in the cell. The magic makes the last call
    (``final``) once the run has ended.

    Views are only updated with the followed run's own snapshots, which appear once rank 0 has applied the reuse
    rules: results the run will not use (another code's, before a ``--force``) are never read.

    An exception in ``func`` is reported once (``report``) and ``func`` is not called again; the run goes on."""

    def __init__(self, view, func, live, interval=LIVE_INTERVAL, report=None):
        self.view = view
        self.func = func
        self.live = live
        self.interval = interval
        self.report = report or (lambda message: log.warning("%s", message))
        self.calls = 0
        self._last = None
        self._shown = -1

    def update(self, progress):
        self.view.update(progress)
        now = time.monotonic()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            self._call(final=False)

    def close(self, progress):
        self.view.close(progress)

    def final(self, values=None):
        """The last call, once the run has ended: with every result (``values``, in job order) when it
        succeeded, else with the part that finished."""
        if values is not None:
            self._invoke(self.live.args, list(values))
        else:
            self._call(final=True)

    def _call(self, final):
        if self.func is None:
            return
        try:
            self.live.refresh()
        except OSError as exc:
            log.debug("live results unreadable now (%s); tried again at the next refresh", exc)
            return
        if len(self.live) == self._shown and not final:
            return
        self._shown = len(self.live)
        _, args, values = self.live.finished()
        self._invoke(args, values)

    def _invoke(self, args, values):
        if self.func is None:
            return
        try:
            self.func(args, values)
        except Exception as exc:  # noqa: BLE001 - a broken plot must not stop the run; said once, then dropped
            name = getattr(self.func, "__name__", repr(self.func))
            self.report(f"--live {name} raised {type(exc).__name__}: {exc}; it is not called again in this run")
            self.func = None
            return
        self.calls += 1
