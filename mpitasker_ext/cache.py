"""The on-disk run directory: the one module that knows its format.

``<output>.mpi/`` holds a manifest, per-process append-only journals of framed job records, a status file and a
lock. Journals, not a file per job: creating a file costs ~0.7 ms here while appending a frame costs ~3 us, and a
million files in one directory is its own outage. Every reader treats damage as a cache miss, never as a crash.
See docs/design.md for the byte layout.
"""

import hashlib
import json
import logging
import os
import pickle
import secrets
import shutil
import socket
import struct
import time
import types
import zlib
from dataclasses import dataclass

from .errors import CacheError, RunLocked, UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
LOCK_STALE_AFTER = 120.0

_FRAME = struct.Struct("<4sII")  # magic, body length, crc32 of body
_FIELDS = struct.Struct("<QB16sd")  # job index, status, args digest, seconds spent
_FRAME_MAGIC = b"MTJ\x01"
OK, FAILED, STARTED = 0, 1, 2  # a STARTED record lists a batch a worker is about to run
MAX_RECORD = (1 << 32) - 1 - 64


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


def args_digest(arg):
    """A 16-byte identity of one job's argument, so a record is reused only for the same input."""
    try:
        data = dumps(_canonical(arg), protocol=HASH_PROTOCOL)
    except Exception as exc:
        raise UsageError(
            f"a job argument of type {type(arg).__name__} cannot be pickled ({exc}); arguments are stored with the "
            "results, so pass picklable values (numbers, strings, tuples, arrays) and build other objects inside "
            "the job function") from exc
    return hashlib.blake2b(data, digest_size=16).digest()


def _canonical(value):
    """Sets pickle in hash order, which differs between processes; sort them so every rank agrees."""
    kind = type(value)
    if kind is tuple or kind is list:
        items = [_canonical(v) for v in value]
        return items if kind is list else tuple(items)
    if kind is set or kind is frozenset:
        return (kind.__name__, sorted((_canonical(v) for v in value), key=repr))
    if kind is dict:
        return {k: _canonical(v) for k, v in value.items()}
    return value


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


def code_fingerprint(fn):
    """A hash of what the function does: bytecode, constants, names, captured values and the globals it reads
    (recursively through the functions it calls), not where its lines are or which file defined it."""
    h = hashlib.blake2b(digest_size=16)
    _hash_callable(h, fn, depth=0, seen=set())
    return h.hexdigest()


def _hash_callable(h, fn, depth, seen):
    code = getattr(fn, "__code__", None)
    if code is None or id(fn) in seen:
        h.update(repr(getattr(fn, "__qualname__", type(fn).__qualname__)).encode())
        return
    seen.add(id(fn))
    _hash_code(h, code)
    values = [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ()) if _cell_filled(cell)]
    namespace = getattr(fn, "__globals__", {})
    names = sorted(n for n in _global_names(code) if n in namespace)
    for name, value in [(None, v) for v in values] + [(n, namespace[n]) for n in names]:
        if name:
            h.update(name.encode())
        if isinstance(value, types.ModuleType):
            h.update(b"module:" + value.__name__.encode())
        elif hasattr(value, "__code__") and depth < 4:
            _hash_callable(h, value, depth + 1, seen)
        elif isinstance(value, type):
            h.update(b"class:" + value.__qualname__.encode())
        else:
            h.update(_stable_bytes(value))


def _cell_filled(cell):
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _global_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


def _hash_code(h, code):
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(h, const)
        elif isinstance(const, frozenset):
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())


def _stable_bytes(value):
    try:
        return pickle.dumps(value, protocol=HASH_PROTOCOL)
    except Exception:  # noqa: BLE001 - any unpicklable capture still gets a (weaker) identity
        return type(value).__qualname__.encode()


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One journal record: a finished job (ok or failed) or a started batch; the payload stays pickled."""

    index: int
    kind: int
    digest: bytes
    seconds: float
    payload: bytes

    @property
    def ok(self):
        return self.kind == OK

    def value(self):
        """The job's result if ok, its failure dict if failed, the batch's indices if started."""
        return pickle.loads(self.payload)


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
    except ValueError:
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

    def __init__(self, path, rank=None, fsync_interval=FSYNC_INTERVAL):
        self.path = path
        self._fsync_interval = fsync_interval
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._last_sync = time.monotonic()
        writer = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self._write((JOURNAL_MAGIC_LINE % FORMAT_VERSION)[:-1] + b" " + json.dumps(writer).encode() + b"\n")

    def append(self, index, ok, digest, seconds, payload):
        """One finished job, in one write() straight to the OS."""
        self._write(encode_record(index, OK if ok else FAILED, digest, seconds, payload))
        self._maybe_sync()

    def start_batch(self, indices):
        """Note the batch about to run: if the process dies, the next run knows which job was running."""
        self._write(encode_record(indices[0], STARTED, bytes(16), 0.0, pickle.dumps(list(indices))))

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
            try:
                batch = rec.value()
            except Exception:  # noqa: BLE001 - a damaged batch note only loses this hint
                batch = None
            unfinished = set(batch or ())
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


def _read_json(path):
    """A JSON file's dict, or None when it is missing; damage is logged and reads as missing."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); ignoring it", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("%s does not hold a JSON object; ignoring it", path)
        return None
    return data


def _pid_alive(pid):
    """True for a running process; a zombie (killed, not yet reaped by a lax init) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"


class RunCache:
    """The run directory of one output file, and the output file itself."""

    def __init__(self, output):
        output = os.fspath(output)
        if not output:
            raise UsageError("the output path is empty; give a file name such as 'results.pkl'")
        self.output = os.path.abspath(output)
        self.run_dir = run_dir_for(self.output)
        self._lock_held = False

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

    # -- code identity of a finished output (kept only when the caller asks: the notebook magic) ---------------
    @property
    def meta_path(self):
        return self.output + META_SUFFIX

    def write_meta(self, njobs, fingerprint, function_name="", final_status=None):
        """The code identity of a finished output, and its last status so views can still show how it went."""
        meta = {"format": FORMAT_VERSION, "njobs": njobs, "code": fingerprint, "function": function_name,
                "status": final_status}
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

    def new_journal(self, rank):
        """A fresh journal for this process; a new file per run, so a torn tail is never appended to."""
        name = f"{JOURNAL_PREFIX}r{rank:05d}-{secrets.token_hex(4)}{JOURNAL_SUFFIX}"
        try:
            return JournalWriter(self.path(name), rank)
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
                with open(path, "rb") as f:
                    data = f.read()
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
    def acquire_lock(self):
        """Exclusive use of the run directory; a lock left by a dead process is taken over."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        path = self.path(LOCK)
        for _attempt in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_json(path) or {}
                if not self._lock_is_stale(holder):
                    raise RunLocked(
                        f"{self.output} is being computed by another process (pid {holder.get('pid')} on host "
                        f"{holder.get('host')}, lock {path}). Wait for it to finish, or use another output path; "
                        "if that process is gone, delete the lock file.") from None
                log.warning("taking over the lock %s left by pid %s on %s, which is no longer running",
                            path, holder.get("pid"), holder.get("host"))
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as exc:
                raise CacheError(f"cannot create the lock {path}: {exc.strerror}") from exc
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._lock_held = True
            return
        raise RunLocked(f"could not take the lock {path}: another process keeps recreating it")

    def _lock_is_stale(self, holder):
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host == socket.gethostname():
            return not _pid_alive(pid)
        status = self.read_status() or {}
        last = status.get("updated") or holder.get("since")
        if not isinstance(last, (int, float)):
            try:
                last = os.path.getmtime(self.path(LOCK))
            except OSError:
                return True
        return time.time() - last > LOCK_STALE_AFTER

    def release_lock(self):
        if self._lock_held:
            self._lock_held = False
            try:
                os.unlink(self.path(LOCK))
            except FileNotFoundError:
                pass
