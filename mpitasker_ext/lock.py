"""One run per output path: the run lock, and the one rule for "is the process writing this run still there".

The lock appears with its content in one step (a hard link of a temp file), so no reader ever sees it half
written; while it is held a heartbeat thread refreshes its mtime, so a long job, prepare or finish never looks
abandoned to a run on another host. A lock whose holder is gone is taken over under a guard file. See
docs/design.md ("Lock").
"""

import contextlib
import errno
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from .errors import CacheError, RunLocked
from .files import MAX_JSON_FILE, open_regular, read_json, unlink_quietly

log = logging.getLogger(__name__)

LOCK_STALE_AFTER = 120.0  # seconds without a heartbeat before a holder on another host counts as gone
LOCK_HEARTBEAT = 2.0  # how often a held lock file's mtime is refreshed
TAKEOVER_SUFFIX = ".takeover"
TAKEOVER_STALE_AFTER = 30.0  # a takeover guard older than this was abandoned by a dying taker


def proc_start(pid):
    """When the process started (clock ticks since boot, field 22 of /proc/<pid>/stat): with the pid, an
    identity a later process reusing the pid does not share. None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid, start=None):
    """True for a running process; a zombie (killed, not yet reaped by a lax init) counts as dead, and so does
    another process that reuses the pid when ``start`` (see ``proc_start``) is given."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass                                        # it exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone since kill(), unless there is no /proc at all
    except OSError:
        return True
    if fields[:1] == [b"Z"]:
        return False
    if start is not None and len(fields) > 19 and fields[19].isdigit():
        return int(fields[19]) == start
    return True


def writer_alive(pid, host, start=None, last_beat=None, stale_after=LOCK_STALE_AFTER, now=None):
    """The one rule for "is the process writing this run still there", for the lock and for progress readers.

    On this host the pid decides (a zombie, or a later process reusing the pid, is dead): clocks and heartbeats
    do not matter. Elsewhere the pid means nothing here, so only a heartbeat (``last_beat``: the newest of the
    lock file's mtime and the status file's ``updated``) younger than ``stale_after`` seconds keeps it alive.
    """
    if isinstance(pid, int) and host == socket.gethostname():
        return pid_alive(pid, start)
    if not isinstance(last_beat, (int, float)) or not math.isfinite(last_beat):
        return False
    now = time.time() if now is None else now
    return now - last_beat <= stale_after


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about its holder, and when its heartbeat last touched it (``mtime``).

    ``readable`` is False for an empty or damaged file: then only its mtime can tell whether it is held."""

    path: str
    pid: int | None = None
    host: str = ""
    since: float | None = None
    start: int | None = None
    token: str = ""
    mtime: float = 0.0
    readable: bool = True

    def alive(self, status_updated=None, stale_after=LOCK_STALE_AFTER, now=None):
        if not self.readable:
            return writer_alive(None, None, last_beat=self.mtime, stale_after=stale_after, now=now)
        beat = max((t for t in (self.mtime, status_updated) if isinstance(t, (int, float))), default=None)
        return writer_alive(self.pid, self.host, self.start, beat, stale_after, now)

    def describe(self, now=None):
        """For messages: who holds it, and how recently it showed signs of life."""
        age = (time.time() if now is None else now) - self.mtime
        if not self.readable:
            return f"its lock {self.path} is empty or unreadable, last touched {age:.0f} s ago"
        return f"pid {self.pid} on host {self.host}, lock {self.path}, heartbeat {age:.0f} s ago"


def read_lock(path):
    """The holder named by a lock file, or None when there is none."""
    try:
        with open_regular(path) as f:
            mtime = os.fstat(f.fileno()).st_mtime
            data = f.read(MAX_JSON_FILE)
    except FileNotFoundError:
        return None
    except OSError:
        data = b""                                  # judged by its mtime alone, as an empty lock is
        try:
            mtime = os.lstat(path).st_mtime
        except FileNotFoundError:
            return None
        except OSError:
            mtime = time.time()  # cannot even look at it: assume it is held
    try:
        info = json.loads(data)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return LockHolder(path, mtime=mtime, readable=False)

    def typed(key, kind, default=None):
        value = info.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else default

    return LockHolder(path, typed("pid", int), typed("host", str, ""), typed("since", (int, float)),
                      typed("start", int), typed("token", str, ""), mtime)


class RunLock:
    """``lock.json`` of one run directory. ``status_path`` is read too: an older writer beats only through the
    status file's ``updated``."""

    def __init__(self, path, output, status_path):
        self.path, self._output, self._status_path = path, output, status_path
        self._held = False
        self._token = None
        self._heartbeat = None

    def holder(self):
        """The lock's holder (a ``LockHolder``), or None when the run is not locked."""
        return read_lock(self.path)

    def acquire(self):
        """Exclusive use of the run directory. A lock whose holder is gone is taken over; a live holder stops
        this run with ``RunLocked``."""
        token = secrets.token_hex(8)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "start": proc_start(os.getpid()), "token": token}
        data = json.dumps(me).encode()
        tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.tmp-{os.getpid()}-{token}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            for _attempt in range(5):
                if _publish(tmp, data, self.path):
                    break
                holder = self.holder()
                if holder is None:
                    continue                        # released between our two looks
                if holder.alive(self._status_updated()):
                    raise RunLocked(self._locked_message(holder))
                if self._take_over(tmp, data, holder):
                    break
            else:
                raise RunLocked(f"could not take the lock {self.path}: other processes keep taking it. Wait for "
                                "them to finish, or use another output path.")
            self._token, self._held = token, True
        except OSError as exc:
            raise CacheError(f"cannot create the lock {self.path}: {exc.strerror}") from exc
        finally:
            unlink_quietly(tmp)
        self._start_heartbeat()

    def release(self):
        """Stop the heartbeat and remove the lock, unless it is no longer ours (never delete another run's)."""
        if not self._held:
            return
        self._held = False
        stop, thread = self._heartbeat
        self._heartbeat = None
        stop.set()
        thread.join(1.0)
        holder = self.holder()
        if holder is None:
            return
        if holder.token != self._token:
            log.warning("the lock %s is no longer this run's (%s); leaving it", holder.path, holder.describe())
            return
        unlink_quietly(holder.path)

    @contextlib.contextmanager
    def held(self):
        """``with lock.held():`` holds the lock (with its heartbeat) for the block."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def _status_updated(self):
        return (read_json(self._status_path) or {}).get("updated")

    def _locked_message(self, holder):
        return (f"{self._output} is being computed by another process ({holder.describe()}). Wait for it to "
                "finish, or use another output path; if that process is gone, delete the lock file.")

    def _take_over(self, tmp, data, judged):
        """Replace a lock whose holder is gone. Takers serialise on a guard file and re-check the lock under it,
        so of two processes that both judged it abandoned, the second sees the first's live lock and stops."""
        guard = self.path + TAKEOVER_SUFFIX
        if not _claim_guard(guard):
            raise RunLocked(f"{self._output}: another process is taking over the lock {self.path} right now "
                            f"({judged.describe()}, no longer running). Wait for that run, or use another "
                            "output path.")
        try:
            holder = self.holder()
            if holder is None:
                return _publish(tmp, data, self.path)     # released meanwhile: an ordinary take
            if holder.alive(self._status_updated()):
                raise RunLocked(self._locked_message(holder))
            log.warning("taking over the lock %s: its holder is gone (%s)", self.path, holder.describe())
            os.replace(tmp, self.path)
            return True
        finally:
            unlink_quietly(guard)

    def _start_heartbeat(self):
        stop = threading.Event()
        path = self.path

        def beat():
            while not stop.wait(LOCK_HEARTBEAT):
                try:
                    os.utime(path)
                except FileNotFoundError:
                    return                          # the run directory was removed at the end of the run
                except OSError as exc:
                    log.warning("cannot refresh the lock %s (%s); a run on another host may take it over "
                                "after %.0f s", path, exc.strerror, LOCK_STALE_AFTER)

        thread = threading.Thread(target=beat, name="mpitasker-lock-heartbeat", daemon=True)
        thread.start()
        self._heartbeat = (stop, thread)


def _publish(tmp, data, path):
    """Make ``tmp`` (holding ``data``) appear as ``path`` unless ``path`` exists; True if it did.

    A hard link is atomic and brings the content with it, on local disks and on NFS (where a lost reply can
    report EEXIST for a link that was made: the link count of ``tmp`` tells). Where hard links are not
    supported, O_EXCL then write: a reader treats that brief empty file as held, so it is still safe."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return os.stat(tmp).st_nlink == 2
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _claim_guard(guard):
    """Create the takeover guard, or say another taker holds it. A guard is judged by its mtime only: one older
    than TAKEOVER_STALE_AFTER was left by a taker that died in the few milliseconds it needs."""
    for _attempt in range(2):
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            try:
                age = time.time() - os.stat(guard).st_mtime
            except FileNotFoundError:
                continue
            if age <= TAKEOVER_STALE_AFTER:
                return False
            log.warning("removing %s, left %.0f s ago by a process that died while taking over the lock",
                        guard, age)
            unlink_quietly(guard)
    return False


__all__ = ["LockHolder", "RunLock", "read_lock", "writer_alive", "pid_alive", "proc_start"]
