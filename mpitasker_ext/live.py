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

from .files import open_regular, pread_into
from .identity import args_digests
from .payload import load_frame
from .rundir import RunDir
from .scan import read_appended
from .store import ResultStore

log = logging.getLogger(__name__)

LIVE_INTERVAL = 1.0  # seconds between calls of a --live function: drawing a figure costs more than reading
SHARED_READ = 1 << 20  # frames appended since the last refresh are read in one go up to this many bytes
OUT_OF_BAND_MIN = 4096  # a frame this big may hold an array's bytes: it gets its own buffer, not a shared one
LIVE_SHARE = 0.015  # of a core, at most, spent reading results while the run goes on (the view costs ~2% more)
LIVE_HEADSTART = 2.0  # seconds of that share the first refreshes may spend at once (hashing the arguments)


class LiveResults:
    """What is finished of the sweep ``args`` on ``output``, refreshed incrementally.

    ``refresh()`` reads new records and returns how many jobs gained a result; ``finished()`` gives
    ``(indices, args, values)`` of the finished jobs in job order."""

    def __init__(self, output, args):
        self.output = os.fspath(output)
        self.args = args
        self._jobs = None  # digest -> job indices, computed on the first refresh (hashing the arguments once)
        self._values = {}
        self._order = []  # the finished jobs' indices, sorted when asked (mostly in order already: cheap)
        self._read_to = {}  # (device, inode) of a journal -> offset read up to: a journal the run moved into the
        #                     store at its end (a rename) is not read again
        self._run = RunDir(self.output)
        self._store = ResultStore(self.output)

    def _jobs_by_digest(self):
        if self._jobs is None:
            jobs = {}
            for index, digest in enumerate(args_digests(self.args)):
                jobs.setdefault(digest, []).append(index)
            self._jobs = jobs
        return self._jobs

    def refresh(self, max_results=None):
        """Read what was appended since the last refresh (at most ``max_results`` results: the rest waits for the
        next call); return the number of jobs that gained a result."""
        jobs = self._jobs_by_digest()
        gained = 0
        for path in self._store.journal_paths() + self._run.journal_paths():
            left = None if max_results is None else max_results - gained
            if left is not None and left <= 0:
                break
            try:
                gained += self._read_journal(path, jobs, left)
            except FileNotFoundError:
                pass  # moved into the store at the end of the run: the same file (inode) is read on there
            except OSError as exc:
                log.debug("live results: %s unreadable now (%s); tried again next refresh", path, exc)
        return gained

    @property
    def complete(self):
        return len(self._values) == len(self.args)

    def _read_journal(self, path, jobs, max_results):
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        start = self._read_to.get(key, 0)
        if start >= st.st_size:
            return 0
        records, read_to = read_appended(path, start, max_records=max_results)
        wanted = []
        for _index, digest, location in records:
            waiting = [i for i in jobs.get(digest, ()) if i not in self._values]
            if waiting:
                wanted.append((location, waiting))
        gained = self._load(path, wanted) if wanted else 0
        self._read_to[key] = read_to
        return gained

    def _load(self, path, wanted):
        """The values of ``wanted`` ((location, job indices), in file order) from one open journal: small frames
        from one read per ``SHARED_READ`` bytes of their span (a refresh costs a few syscalls, not one per
        result), large ones each into its own buffer (an array's view must not keep a shared buffer alive)."""
        gained = 0
        with open_regular(path) as f:
            window, low = memoryview(b""), 0
            for location, waiting in wanted:
                offset, length = location.offset, location.length
                if length >= OUT_OF_BAND_MIN:
                    frame = bytearray(length)
                    frame = memoryview(frame)[:pread_into(f, frame, offset)]
                else:
                    if not low <= offset or offset + length > low + len(window):
                        low, window = offset, bytearray(SHARED_READ)
                        window = memoryview(window)[:pread_into(f, window, offset)]
                    frame = window[offset - low:offset - low + length]
                try:
                    value = load_frame(location, frame, len(frame), checked=True)   # the walk checked its CRC
                except (OSError, MemoryError):
                    raise                  # passing trouble: read again from the same offset at the next refresh
                except Exception as exc:  # noqa: BLE001 - unpickling can raise anything; the final results decide
                    # a result that does not load here (a renamed class): rank 0 sets it aside and computes it
                    # again, and that record is read when it arrives
                    log.debug("live results: the result at %s does not load here (%s: %s); left out",
                              location, type(exc).__name__, exc)
                    continue
                for index in waiting:
                    self._values[index] = value
                self._order.extend(waiting)
                gained += len(waiting)
        return gained

    def __len__(self):
        return len(self._values)

    def finished(self):
        """``(indices, args, values)`` of the jobs finished so far, in job order."""
        self._order.sort()
        indices, args, values = list(self._order), self.args, self._values
        return indices, [args[i] for i in indices], [values[i] for i in indices]


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
        self._per_result = 20e-6  # seconds to read one result, measured as it goes
        self._spent = 0.0  # seconds spent reading while the run went on
        self._since = None

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
        succeeded, else with the part that finished. The results already read are not read again."""
        if values is None:
            self._call(final=True)
            return
        if self.func is None:
            return
        try:
            self.live.refresh()
        except OSError as exc:
            log.debug("live results unreadable at the end (%s); the results are read instead", exc)
        if self.live.complete:
            _, args, done = self.live.finished()
            self._invoke(args, done)
        else:
            self._invoke(self.live.args, list(values))

    def _call(self, final):
        if self.func is None:
            return
        started = time.perf_counter()
        budget = None
        if not final:     # everything read while the run goes on (hashing, reading, the lists) stays in budget
            self._since = started if self._since is None else self._since
            left = LIVE_SHARE * (started - self._since + LIVE_HEADSTART) - self._spent
            if left <= 0:
                return    # a very fast run: the view lags for a moment, the kernel stays free
            budget = max(100, int(left / self._per_result))
        try:
            read = self.live.refresh(budget)
        except OSError as exc:
            log.debug("live results unreadable now (%s); tried again at the next refresh", exc)
            return
        if len(self.live) == self._shown and not final:
            self._spent += time.perf_counter() - started
            return
        self._shown = len(self.live)
        _, args, values = self.live.finished()
        spent = time.perf_counter() - started
        self._spent += spent
        if read >= 100:   # what one result costs here (reading it, and the lists), so a fast run stays in budget
            self._per_result = 0.5 * self._per_result + 0.5 * spent / read
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
