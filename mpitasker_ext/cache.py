"""The on-disk run directory: the one module that knows its format.

``<output>.mpi/`` holds a manifest, per-process append-only journals of framed job records, a status file and a
lock. Journals, not a file per job: creating a file costs ~0.7 ms here while appending a frame costs ~3 us, and a
million files in one directory is its own outage. Every reader treats damage as a cache miss, never as a crash.
See docs/design.md for the byte layout.
"""

import contextlib
import errno
import json
import logging
import math
import os
import pickle
import secrets
import shutil
import socket
import stat
import struct
import threading
import time
import zlib
from dataclasses import dataclass

from .errors import CacheError, RunLocked, UsageError
from .identity import args_digest, code_fingerprint  # noqa: F401 - the cache's identities, re-exported

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: failed/started payloads are JSON/packed indices; 3: ok payloads carry out-of-band buffers
RUN_SUFFIX = ".mpi"
MANIFEST = "manifest.json"
STATUS = "status.json"
LOCK = "lock.json"
META_SUFFIX = ".code.json"
JOURNAL_PREFIX = "journal-"
JOURNAL_SUFFIX = ".bin"
JOURNAL_MAGIC_LINE = b"MPITASKER-JOURNAL %d\n"
HASH_PROTOCOL = 5
RESULT_PROTOCOL = pickle.HIGHEST_PROTOCOL
FSYNC_INTERVAL = 1.0
LOCK_STALE_AFTER = 120.0  # seconds without a heartbeat before a holder on another host counts as gone
LOCK_HEARTBEAT = 2.0  # how often a held lock file's mtime is refreshed
TAKEOVER_SUFFIX = ".takeover"
TAKEOVER_STALE_AFTER = 30.0  # a takeover guard older than this was abandoned by a dying taker

_FRAME = struct.Struct("<4sII")  # magic, body length, crc32 of body
_FIELDS = struct.Struct("<QB16sd")  # job index, status, args digest, seconds spent
_FRAME_MAGIC = b"MTJ\x01"
_BATCH_INDEX = struct.Struct("<Q")  # a started record's payload: the batch's job indices, packed
OK, FAILED, STARTED = 0, 1, 2  # a STARTED record lists a batch a worker is about to run
MAX_RECORD = (1 << 32) - 1 - 64
FAILURE_FIELDS = ("index", "arg", "error", "traceback")
UNREADABLE_FAILURE = "(failure record unreadable)"
_IOV_MAX = 1024  # parts per writev: IOV_MAX on Linux and the BSDs


def dumps(obj, protocol=RESULT_PROTOCOL):
    """pickle, or cloudpickle for what only it can carry (instances of classes defined in a notebook cell)."""
    try:
        return pickle.dumps(obj, protocol=protocol)
    except Exception:  # noqa: BLE001 - retried below with cloudpickle, whose error is the one reported
        try:
            import cloudpickle
        except ImportError:
            raise
        return cloudpickle.dumps(obj, protocol=protocol)


def run_dir_for(output):
    return os.fspath(output) + RUN_SUFFIX


class _NullSink:
    def write(self, data):
        return len(data)


def check_picklable(args):
    """Before anything is written: every argument must pickle (one C-level pass, nothing kept in memory)."""
    try:
        pickle.Pickler(_NullSink(), protocol=HASH_PROTOCOL).dump(args)
    except Exception:  # noqa: BLE001 - find and name the culprit below
        for index, arg in enumerate(args):
            try:
                dumps(arg, protocol=HASH_PROTOCOL)
            except Exception as exc:  # noqa: BLE001 - any pickling failure is the same user error
                raise UsageError(
                    f"the argument of job {index} ({type(arg).__name__}) cannot be pickled ({exc}); arguments "
                    "are stored with the results, so pass picklable values (numbers, strings, tuples, arrays) "
                    "and build other objects inside the job function") from exc


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One journal record: a finished job (ok or failed) or a started batch; the payload stays encoded.

    Only an ok payload is a pickle. Failed and started payloads are plain data, so anything that merely reads
    a run directory (progress, the dashboard, the CLI) never unpickles bytes someone may have planted there.
    """

    index: int
    kind: int
    digest: bytes
    seconds: float
    payload: bytes

    @property
    def ok(self):
        return self.kind == OK

    def value(self):
        """An ok record's result, unpickled: only rank 0's scheduler, about to load its own run, calls this."""
        if self.kind != OK:
            raise ValueError(f"job {self.index}: only an ok record holds a pickled result (kind {self.kind})")
        return pickle.loads(self.payload)

    def failure(self):
        """A failed record's dict (index, arg, error, traceback); damage reads as an unreadable failure, never
        as an exception, since a view must still show that the job failed."""
        try:
            info = json.loads(self.payload.decode("utf-8")) if self.kind == FAILED else None
        except (UnicodeDecodeError, ValueError, RecursionError):
            info = None
        if (isinstance(info, dict) and type(info.get("index")) is int and info["index"] == self.index
                and all(isinstance(info.get(key), str) for key in FAILURE_FIELDS[1:])):
            return {**{key: info[key] for key in FAILURE_FIELDS}, **_failure_place(info)}
        return {"index": self.index, "arg": "?", "error": UNREADABLE_FAILURE, "traceback": ""}

    def batch(self):
        """A started record's job indices; a payload that is not whole u64s reads as no batch."""
        if self.kind != STARTED or len(self.payload) % _BATCH_INDEX.size:
            return []
        return [index for (index,) in _BATCH_INDEX.iter_unpack(self.payload)]


@dataclass
class JournalInfo:
    """Who wrote a journal (from its header line), and what it was doing when it stopped."""

    path: str
    rank: int | None = None
    pid: int | None = None
    host: str = ""
    in_flight: int | None = None


def encode_record(index, kind, digest, seconds, payload):
    body = _FIELDS.pack(index, kind, digest, seconds) + payload
    if len(body) > MAX_RECORD:
        raise RecordTooLarge(len(payload))
    return _FRAME.pack(_FRAME_MAGIC, len(body), zlib.crc32(body)) + body


def encode_failure(info):
    """A failed record's payload: UTF-8 JSON of index, arg (short repr), error line, traceback, and the rank and
    host the job ran on."""
    record = {"index": int(info["index"]), **{key: str(info.get(key, "")) for key in FAILURE_FIELDS[1:]}}
    return json.dumps({**record, **_failure_place(info)}).encode("utf-8")


def _failure_place(info):
    """The record's ``rank`` (an int) and ``host`` (text), those it has: older records have neither."""
    place = {}
    if type(info.get("rank")) is int:
        place["rank"] = info["rank"]
    if isinstance(info.get("host"), str):
        place["host"] = info["host"]
    return place


def encode_batch(indices):
    """A started record's payload: the batch's job indices as packed little-endian u64."""
    return struct.pack(f"<{len(indices)}Q", *indices)


class RecordTooLarge(ValueError):
    """A job result beyond what one journal frame can hold (4 GiB)."""

    def __init__(self, size):
        super().__init__(f"the result pickles to {size / 2**30:.1f} GiB, more than a journal record holds "
                         f"({MAX_RECORD / 2**30:.1f} GiB): save it to a file in the job and return the path")


def journal_header(data):
    """The header line's writer info (rank, pid, host), or None if this is not a journal of our format."""
    prefix = JOURNAL_MAGIC_LINE % FORMAT_VERSION
    line_end = data.find(b"\n", 0, 4096)
    if line_end < 0:
        return None
    line = bytes(data[: line_end + 1])
    if line == prefix:
        return {}
    if not line.startswith(prefix[:-1] + b" "):
        return None
    try:
        info = json.loads(line[len(prefix):])
    except (ValueError, RecursionError):  # deep nesting raises RecursionError: damage, like any other
        return {}
    return info if isinstance(info, dict) else {}


def decode_journal(data, name="journal"):
    """Yield the valid records of one journal's bytes; skip torn or corrupt frames with a warning."""
    info = journal_header(data)
    if info is None:
        if data:
            log.warning("%s: not a format-%d journal (starts with %r); its jobs will be recomputed",
                        name, FORMAT_VERSION, bytes(data[:24]))
        return
    pos, end = data.find(b"\n") + 1, len(data)
    skipped = 0
    view = memoryview(data)
    while pos < end:
        if pos + _FRAME.size <= end:
            magic, length, crc = _FRAME.unpack_from(data, pos)
            stop = pos + _FRAME.size + length
            if magic == _FRAME_MAGIC and stop <= end and length >= _FIELDS.size:
                body = view[pos + _FRAME.size:stop]
                if zlib.crc32(body) == crc:
                    index, kind, digest, seconds = _FIELDS.unpack_from(body)
                    yield JobRecord(index, kind, digest, seconds, bytes(body[_FIELDS.size:]))
                    pos = stop
                    continue
        following = data.find(_FRAME_MAGIC, pos + 1)
        if following < 0:
            skipped += end - pos
            tail = True
            break
        skipped += following - pos
        pos = following
    else:
        tail = False
    if skipped:
        where = "a torn tail (a killed writer)" if tail and skipped < _FRAME.size + 64 else "damaged bytes"
        log.warning("%s: skipped %d bytes of %s; the jobs they held will be recomputed", name, skipped, where)


class JournalWriter:
    """Append-only journal of one process: no locks needed, a kill loses nothing already written."""

    def __init__(self, path, rank=None, fsync_interval=FSYNC_INTERVAL, code=None):
        self.path = path
        self._fsync_interval = fsync_interval
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._last_sync = time.monotonic()
        writer = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "code": code}
        self._write((JOURNAL_MAGIC_LINE % FORMAT_VERSION)[:-1] + b" " + json.dumps(writer).encode() + b"\n")

    def append(self, index, ok, digest, seconds, payload):
        """One finished job, in one write() straight to the OS."""
        self._write(encode_record(index, OK if ok else FAILED, digest, seconds, payload))
        self._maybe_sync()

    def append_value(self, index, digest, seconds, encoded):
        """One finished job's result (``store.encode_value``): framed as ``encode_record`` does, the CRC taken
        over the parts in turn and everything written with one ``writev``, so an array's bytes are never copied."""
        length = _FIELDS.size + encoded.size
        if length > MAX_RECORD:
            raise RecordTooLarge(encoded.size)
        fields = _FIELDS.pack(index, OK, digest, seconds)
        parts = encoded.parts()
        crc = zlib.crc32(fields)
        for part in parts:
            crc = zlib.crc32(part, crc)
        self._writev([_FRAME.pack(_FRAME_MAGIC, length, crc) + fields, *parts])
        self._maybe_sync()

    def start_batch(self, indices):
        """Note the batch about to run: if the process dies, the next run knows which job was running."""
        self._write(encode_record(indices[0], STARTED, bytes(16), 0.0, encode_batch(indices)))

    def _maybe_sync(self):
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_interval:
            os.fsync(self._fd)
            self._last_sync = now

    def _write(self, data):
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _writev(self, parts):
        """Write the parts in order, going on after a partial write and IOV_MAX parts at a time."""
        if not hasattr(os, "writev"):
            self._write(b"".join(parts))
            return
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        first = 0
        while first < len(views):
            written = os.writev(self._fd, views[first:first + _IOV_MAX])
            while written and written >= len(views[first]):
                written -= len(views[first])
                first += 1
            if written:
                views[first] = views[first][written:]

    def close(self):
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


def _noting_in_flight(records, info):
    """Pass the records through; once they are all read, ``info.in_flight`` is the first job of the last
    started batch without a record after it: what was running when the writer stopped (memory: one batch)."""
    batch, unfinished = None, set()
    for rec in records:
        if rec.kind == STARTED:
            batch = rec.batch()
            unfinished = set(batch)
        else:
            unfinished.discard(rec.index)
        yield rec
    info.in_flight = next((i for i in batch if i in unfinished), None) if batch else None


def atomic_write_bytes(path, data, durable=True):
    """Write via a temp file and os.replace, so readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


MAX_JSON_FILE = 16 * 2**20


def open_regular(path):
    """Open a file of a run for reading only if it is a regular file, not a symlink (which could lead out of a
    server's root) nor a FIFO or device (which could block or never end a read). Raises OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, limit=None):
    """The bytes of a regular file of a run (see ``open_regular``), refusing one larger than ``limit``."""
    with open_regular(path) as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return f.read()


def journal_code(path):
    """The code fingerprint a journal's header names (None when unknown: an older or a merged journal)."""
    try:
        with open_regular(path) as f:
            info = journal_header(f.read(4096))
    except OSError:
        return None
    return info.get("code") if isinstance(info, dict) and isinstance(info.get("code"), str) else None


def _read_json(path):
    """A JSON file's dict, or None when it is missing; damage is logged and reads as missing."""
    try:
        data = json.loads(read_regular(path, MAX_JSON_FILE))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # a planted file may nest deeper than the parser goes
        log.warning("%s is unreadable (%s); ignoring it", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("%s does not hold a JSON object; ignoring it", path)
        return None
    return data


def _proc_start(pid):
    """When the process started (clock ticks since boot, field 22 of /proc/<pid>/stat): with the pid, an
    identity a later process reusing the pid does not share. None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid, start=None):
    """True for a running process; a zombie (killed, not yet reaped by a lax init) counts as dead, and so does
    another process that reuses the pid when ``start`` (see ``_proc_start``) is given."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
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
        return _pid_alive(pid, start)
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


def _read_lock(path):
    """The holder named by a lock file, or None when there is none."""
    try:
        with open_regular(path) as f:
            mtime = os.fstat(f.fileno()).st_mtime
            data = f.read(MAX_JSON_FILE)
    except FileNotFoundError:
        return None
    except OSError:
        data = b""
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


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
            _unlink_quietly(guard)
    return False


class RunCache:
    """The run directory of one output file, and the output file itself."""

    def __init__(self, output):
        output = os.fspath(output)
        if not output:
            raise UsageError("the output path is empty; give a file name such as 'results.pkl'")
        self.output = os.path.abspath(output)
        self.run_dir = run_dir_for(self.output)
        self._lock_held = False
        self._lock_token = None
        self._heartbeat = None

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def check_output_path(self):
        """Fail early, before any work, if the output can never be written."""
        parent = os.path.dirname(self.output)
        if os.path.isdir(self.output):
            raise UsageError(f"the output path {self.output} is a directory; give a file name inside it, "
                             "e.g. results.pkl")
        if not os.path.isdir(parent):
            raise UsageError(f"the output directory {parent} does not exist; create it first "
                             f"(mkdir -p {parent}) or choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"the output directory {parent} is not writable; choose a directory you can write")

    # -- output file -------------------------------------------------------------------------------------------
    def read_output(self):
        """The finished output's triples, or None if absent or unreadable (then it is recomputed)."""
        try:
            with open(self.output, "rb") as f:
                data = pickle.load(f)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - unpickling damaged bytes can raise almost anything
            log.warning("output file %s cannot be read (%s: %s); recomputing it", self.output,
                        type(exc).__name__, exc)
            return None
        triples = data[0] if isinstance(data, tuple) and len(data) == 1 else data
        if not isinstance(triples, list) or not all(
                isinstance(t, tuple) and len(t) == 3 and isinstance(t[1], list) and len(t[1]) == 1 for t in triples):
            log.warning("output file %s is not a list of (index, [arg], result) triples; recomputing it", self.output)
            return None
        return triples

    def write_output(self, triples):
        """The seed's format: a pickled 1-tuple holding the list of (index, [arg], result)."""
        atomic_write_bytes(self.output, dumps((triples,)))

    # -- beside a finished output: its job count, last status and code identity (JSON, never a pickle) -------
    @property
    def meta_path(self):
        return self.output + META_SUFFIX

    def write_meta(self, njobs, fingerprint, function_name="", final_status=None, grid="", output_identity=None):
        """The code identity of a finished output, its last status so views can still show how it went, and
        which grid and which file it describes (a rerun of the same map then rewrites nothing)."""
        meta = {"format": FORMAT_VERSION, "njobs": njobs, "code": fingerprint, "function": function_name,
                "status": final_status, "grid": grid, "output_identity": output_identity}
        atomic_write_bytes(self.meta_path, json.dumps(meta).encode(), durable=False)

    def read_meta(self):
        return _read_json(self.meta_path)

    # -- run directory -----------------------------------------------------------------------------------------
    def exists(self):
        return os.path.isdir(self.run_dir)

    def create(self):
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the run directory {self.run_dir}: {exc.strerror}") from exc

    def read_manifest(self):
        return _read_json(self.path(MANIFEST))

    def write_manifest(self, njobs, fingerprint, function_name=""):
        manifest = {"format": FORMAT_VERSION, "njobs": njobs, "code": fingerprint, "function": function_name,
                    "output": os.path.basename(self.output), "created": time.time()}
        atomic_write_bytes(self.path(MANIFEST), json.dumps(manifest, indent=1).encode(), durable=False)

    def journal_paths(self):
        try:
            names = os.listdir(self.run_dir)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.run_dir, n) for n in names
                      if n.startswith(JOURNAL_PREFIX) and n.endswith(JOURNAL_SUFFIX))

    def new_journal(self, rank, code=None):
        """A fresh journal for this process; a new file per run, so a torn tail is never appended to. ``code``
        (the fingerprint of the code that computes its results) goes in its header line."""
        name = f"{JOURNAL_PREFIX}r{rank:05d}-{secrets.token_hex(4)}{JOURNAL_SUFFIX}"
        try:
            return JournalWriter(self.path(name), rank, code=code)
        except OSError as exc:
            raise CacheError(f"cannot create journal {self.path(name)}: {exc.strerror}") from exc

    def read_records(self):
        """Every valid job record (ok or failed) of every journal, in file order."""
        for _info, records in self.read_journals():
            yield from (rec for rec in records if rec.kind != STARTED)

    def read_journals(self):
        """Each journal's writer info (with the job it was running when it stopped) and its records."""
        for path in self.journal_paths():
            try:
                data = read_regular(path)
            except OSError as exc:
                log.warning("journal %s is unreadable (%s); its jobs will be recomputed", path, exc.strerror)
                continue
            header = journal_header(data) or {}
            info = JournalInfo(path, header.get("rank"), header.get("pid"), header.get("host", ""))
            yield info, _noting_in_flight(decode_journal(data, path), info)

    def interrupted_jobs(self):
        """Jobs that were running when their process stopped, oldest journal first: (index, JournalInfo)."""
        found = []
        for info, records in self.read_journals():
            for _ in records:
                pass
            if info.in_flight is not None:
                found.append((info.in_flight, info))
        return sorted(found, key=lambda item: os.path.getmtime(item[1].path) if os.path.exists(item[1].path)
                      else 0)

    def discard_records(self):
        """Delete the journals: only on an explicit request to recompute."""
        for path in self.journal_paths():
            os.unlink(path)

    def remove(self):
        shutil.rmtree(self.run_dir)

    # -- status ------------------------------------------------------------------------------------------------
    def write_status(self, status):
        atomic_write_bytes(self.path(STATUS), json.dumps(status).encode(), durable=False)

    def read_status(self):
        return _read_json(self.path(STATUS))

    # -- lock --------------------------------------------------------------------------------------------------
    def read_lock(self):
        """The lock's holder (a ``LockHolder``), or None when the run is not locked."""
        return _read_lock(self.path(LOCK))

    def acquire_lock(self):
        """Exclusive use of the run directory: one run per output. A lock whose holder is gone is taken over.

        The lock appears with its content in one step (a hard link of a temp file), so no reader ever sees it
        half-written; while it is held a heartbeat thread refreshes its mtime, so a long job, prepare or finish
        never looks abandoned to a run on another host."""
        path = self.path(LOCK)
        token = secrets.token_hex(8)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "start": _proc_start(os.getpid()), "token": token}
        data = json.dumps(me).encode()
        tmp = self.path(f".{LOCK}.tmp-{os.getpid()}-{token}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            for _attempt in range(5):
                if _publish(tmp, data, path):
                    break
                holder = self.read_lock()
                if holder is None:
                    continue                        # released between our two looks
                if holder.alive(self._status_updated()):
                    raise RunLocked(self._locked_message(holder))
                if self._take_over(tmp, data, holder):
                    break
            else:
                raise RunLocked(f"could not take the lock {path}: other processes keep taking it. Wait for them "
                                "to finish, or use another output path.")
            self._lock_token, self._lock_held = token, True
        except OSError as exc:
            raise CacheError(f"cannot create the lock {path}: {exc.strerror}") from exc
        finally:
            _unlink_quietly(tmp)
        self._start_heartbeat(path)

    @contextlib.contextmanager
    def locked(self):
        """``with cache.locked():`` holds the lock (with its heartbeat) for the block."""
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    def _status_updated(self):
        """An older writer beats only through the status file: count that too."""
        return (self.read_status() or {}).get("updated")

    def _locked_message(self, holder):
        return (f"{self.output} is being computed by another process ({holder.describe()}). Wait for it to "
                "finish, or use another output path; if that process is gone, delete the lock file.")

    def _take_over(self, tmp, data, judged):
        """Replace a lock whose holder is gone. Takers serialise on a guard file and re-check the lock under it,
        so of two processes that both judged it abandoned, the second sees the first's live lock and stops."""
        path = self.path(LOCK)
        guard = path + TAKEOVER_SUFFIX
        if not _claim_guard(guard):
            raise RunLocked(f"{self.output}: another process is taking over the lock {path} right now "
                            f"({judged.describe()}, no longer running). Wait for that run, or use another "
                            "output path.")
        try:
            holder = self.read_lock()
            if holder is None:
                return _publish(tmp, data, path)     # released meanwhile: an ordinary take
            if holder.alive(self._status_updated()):
                raise RunLocked(self._locked_message(holder))
            log.warning("taking over the lock %s: its holder is gone (%s)", path, holder.describe())
            os.replace(tmp, path)
            return True
        finally:
            _unlink_quietly(guard)

    def _start_heartbeat(self, path):
        stop = threading.Event()

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

    def release_lock(self):
        """Stop the heartbeat and remove the lock, unless it is no longer ours (never delete another run's)."""
        if not self._lock_held:
            return
        self._lock_held = False
        stop, thread = self._heartbeat
        self._heartbeat = None
        stop.set()
        thread.join(1.0)
        holder = self.read_lock()
        if holder is None:
            return
        if holder.token != self._lock_token:
            log.warning("the lock %s is no longer this run's (%s); leaving it", holder.path, holder.describe())
            return
        _unlink_quietly(holder.path)
