"""Finished results at scale: encoding them for the journal, finding them without unpickling, reading one at a time.

A result is pickled with protocol 5 and out-of-band buffers, so a numpy array's bytes go from the array to the
journal with one ``writev`` and come back as a view into the bytes read, never copied in between. Scans read frame
headers and checksums only; a value is unpickled when someone asks for that value. ``<output>.cache/`` keeps the
results of one output path until the user discards them, so a grid narrowed and widened again recomputes nothing.
See docs/design.md for the byte layouts.
"""

import array
import collections
import collections.abc
import errno
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
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from . import cache as cachemod
from .errors import CacheError, UsageError

log = logging.getLogger(__name__)

STORE_SUFFIX = ".cache"
STORE_META = "store.json"
INDEX = "index.bin"
ARGS = "args.pkl"
PROTOCOL = 5
CHUNK = 4 << 20  # scans and copies read this much at a time
OUT_OF_BAND_MIN = 4096  # smaller buffers stay inside the pickle: an iovec costs more than copying them
OPEN_JOURNALS = 8  # journal files a Results keeps open

_PAYLOAD_HEAD = struct.Struct("<IQ")  # an ok payload: number of buffers, pickle length
_LENGTH = struct.Struct("<Q")  # before each out-of-band buffer
_INDEX_HEAD = struct.Struct("<8sIIQ16s")  # magic, format, journals, jobs, blake2b of args.pkl
_INDEX_MAGIC = b"MTINDEX\x00"
_INDEX_NAME = struct.Struct("<I")  # before each journal name (UTF-8, surrogate-escaped)
_INDEX_ENTRY = struct.Struct("<IQQ")  # per job: journal number, frame offset, frame length
_HEAD = cachemod._FRAME.size
_FIXED = _HEAD + cachemod._FIELDS.size
_BODY_PAYLOAD = cachemod._FIELDS.size  # where the payload starts inside a body


class DamagedRecord(CacheError):
    """A stored result that cannot be read back as it was written."""


# -- encoding ------------------------------------------------------------------------------------------------------

class Encoded:
    """A pickled result and the raw buffers pickle left out of it; ``parts()`` are the payload's pieces in order,
    so the journal writes them with one ``writev`` and never joins the big ones."""

    __slots__ = ("pickle", "buffers", "size")

    def __init__(self, data, buffers):
        self.pickle = data
        self.buffers = buffers
        self.size = _PAYLOAD_HEAD.size + len(data) + sum(_LENGTH.size + b.nbytes for b in buffers)

    def parts(self):
        parts = [_PAYLOAD_HEAD.pack(len(self.buffers), len(self.pickle)), self.pickle]
        for buffer in self.buffers:
            parts += (_LENGTH.pack(buffer.nbytes), buffer)
        return parts

    def to_bytes(self):
        return b"".join(self.parts())


def encode_value(value):
    """Pickle protocol 5 with out-of-band buffers; cloudpickle for what only it can carry (notebook classes).

    Raises whatever pickling raises: the caller makes that the job's failure."""
    buffers = []

    def out_of_band(buffer):
        try:
            raw = buffer.raw()
        except BufferError:                 # neither C- nor Fortran-contiguous: pickle copies it in-band
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    try:
        data = pickle.dumps(value, protocol=PROTOCOL, buffer_callback=out_of_band)
    except Exception:  # noqa: BLE001 - retried below with cloudpickle, whose error is the one reported
        try:
            import cloudpickle
        except ImportError:
            raise
        buffers.clear()
        data = cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=out_of_band)
    return Encoded(data, buffers)


def decode_payload(payload):
    """An ok payload (format 3) back to its value; the arrays are views into ``payload`` (writable when it is)."""
    view = memoryview(payload)
    try:
        nbuffers, plen = _PAYLOAD_HEAD.unpack_from(view, 0)
    except struct.error:
        raise ValueError("the payload is shorter than its header") from None
    pos = _PAYLOAD_HEAD.size + plen
    if pos > len(view):
        raise ValueError("the pickle runs past the end of the payload")
    data = view[_PAYLOAD_HEAD.size:pos]
    buffers = []
    for _ in range(nbuffers):
        if pos + _LENGTH.size > len(view):
            raise ValueError("a buffer's length runs past the end of the payload")
        (length,) = _LENGTH.unpack_from(view, pos)
        pos += _LENGTH.size
        if pos + length > len(view):
            raise ValueError("a buffer runs past the end of the payload")
        buffers.append(view[pos:pos + length])
        pos += length
    if pos != len(view):
        raise ValueError(f"{len(view) - pos} bytes follow the last buffer")
    return _Pickled(data, buffers)


class _Pickled(NamedTuple):
    data: memoryview
    buffers: list

    def load(self):
        return pickle.loads(self.data, buffers=self.buffers)


# -- scanning ------------------------------------------------------------------------------------------------------

class Location(NamedTuple):
    """Where one ok record's frame is: its journal, the frame's first byte and its whole length."""

    journal: str
    offset: int
    length: int


class LocationMap(collections.abc.Mapping):
    """``{digest: Location}``, kept as one int per record: a million results cost ~70 MB less than as tuples."""

    __slots__ = ("_paths", "_codes")

    def __init__(self):
        self._paths, self._codes = [], {}

    def _location(self, code):
        return Location(self._paths[code >> 80], (code >> 32) & _OFFSET_MASK, code & 0xFFFFFFFF)

    def __getitem__(self, digest):
        return self._location(self._codes[digest])

    def get(self, digest, default=None):
        code = self._codes.get(digest)
        return default if code is None else self._location(code)

    def __contains__(self, digest):
        return digest in self._codes

    def __iter__(self):
        return iter(self._codes)

    def __len__(self):
        return len(self._codes)

    def __repr__(self):
        return f"LocationMap({len(self)} results)"


_OFFSET_MASK = (1 << 48) - 1


class _IndexLocations:
    """Ok records of the current grid, by job index: two flat arrays (journal|offset, length), 0 = none."""

    def __init__(self, mapping, grid):
        self._mapping, self.grid = mapping, grid
        self._where = array.array("Q", bytes(8 * len(grid)))
        self._length = array.array("L", bytes(array.array("L").itemsize * len(grid)))

    def put(self, index, where, length):
        if not self._where[index]:                  # the first valid record of a job, as for digests
            self._where[index], self._length[index] = where, length

    def get(self, index):
        where = self._where[index]
        if not where:
            return None
        return Location(self._mapping._paths[where >> 48], where & _OFFSET_MASK, self._length[index])

    def holds(self, index, digest):
        """Whether job ``index``, of argument ``digest``, has its ok record here."""
        return 0 <= index < len(self.grid) and bool(self._where[index]) and self.grid[index] == digest


@dataclass
class Scan:
    """What the journals hold, from headers and checksums only.

    ``ok``: the first valid ok record of each argument digest; ``failed``: the latest failed record of each digest
    without an ok one (payload kept: it is small JSON); ``interrupted``: journals whose writer stopped inside a
    batch, oldest first, ``in_flight`` being the job it was running; ``records``: valid ok and failed records;
    ``old_format``: ok records of format-2 journals, passed over (their payload is a bare pickle)."""

    ok: LocationMap = field(default_factory=LocationMap)
    at_index: object = None
    failed: dict = field(default_factory=dict)
    interrupted: list = field(default_factory=list)
    records: int = 0
    old_format: int = 0


def _header(data):
    """(format, writer info) of a journal's first line, or (None, None) when it is not one of ours."""
    line_end = data.find(b"\n", 0, 4096)
    if line_end < 0:
        return None, None
    line = bytes(data[:line_end + 1])
    for version in (cachemod.FORMAT_VERSION, 2):
        prefix = cachemod.JOURNAL_MAGIC_LINE % version
        if line == prefix:
            return version, {}
        if line.startswith(prefix[:-1] + b" "):
            try:
                info = json.loads(line[len(prefix):])
            except (ValueError, RecursionError):  # deep nesting raises RecursionError: damage, like any other
                return version, {}
            return version, info if isinstance(info, dict) else {}
    return None, None


def scan_journals(paths, grid=None):
    """Find every record in these journals without unpickling anything or holding a payload in memory.

    Damage is handled as ``cache.decode_journal`` does (skip to the next frame magic, one warning per file), so a
    torn or flipped record is a miss, never a crash. With ``grid`` (the current run's digests, by job index), an
    ok record written for job i of this very grid is kept by index in ``Scan.at_index`` (12 bytes a job) rather
    than in the digest mapping (~120 bytes a record): what a run just computed costs rank 0 little memory."""
    scan = Scan()
    if grid is not None:
        scan.at_index = _IndexLocations(scan.ok, grid)
    interrupted = []
    for path in paths:
        try:
            with cachemod.open_regular(path) as f:     # a FIFO or a symlink planted as a journal is refused
                st = os.fstat(f.fileno())
                info = _scan_file(path, f, st.st_size, scan)
        except OSError as exc:
            log.warning("journal %s is unreadable (%s); its jobs will be recomputed", path, exc.strerror or exc)
            continue
        if info is not None and info.in_flight is not None:
            interrupted.append((st.st_mtime, info))
    for digest in scan.ok._codes.keys() & scan.failed.keys():
        del scan.failed[digest]
    if scan.at_index is not None:
        for digest in [d for d, rec in scan.failed.items() if scan.at_index.holds(rec.index, d)]:
            del scan.failed[digest]
    scan.interrupted = [info for _, info in sorted(interrupted, key=lambda item: item[0])]
    return scan


def _scan_file(path, f, size, scan):
    """One journal into ``scan``; returns its writer info with the job in flight, or None if not a journal."""
    first = f.read(min(size, CHUNK))
    version, header = _header(first)
    if version is None:
        if first:
            log.warning("%s: not a format-%d journal (starts with %r); its jobs will be recomputed",
                        path, cachemod.FORMAT_VERSION, bytes(first[:24]))
        return None
    info = cachemod.JournalInfo(path, header.get("rank"), header.get("pid"), header.get("host", ""))
    usable = version == cachemod.FORMAT_VERSION
    ok, failed = scan.ok._codes, scan.failed
    at_index = scan.at_index
    grid = at_index.grid if at_index is not None else None
    journal = len(scan.ok._paths) << 48
    scan.ok._paths.append(path)
    frame_unpack, fields_unpack, crc32 = cachemod._FRAME.unpack_from, cachemod._FIELDS.unpack_from, zlib.crc32
    magic_ok, min_body, ok_kind, failed_kind, started_kind = (
        cachemod._FRAME_MAGIC, cachemod._FIELDS.size, cachemod.OK, cachemod.FAILED, cachemod.STARTED)
    buf, base = first, 0
    view = memoryview(buf)
    pos = first.find(b"\n") + 1
    skipped, tail = 0, False
    batch, unfinished = None, set()
    records = old = streamed = 0
    while pos < size:
        rel = pos - base
        if rel + _FIXED > len(buf) and base + len(buf) < size:
            buf, base, rel = _read_at(f, pos, CHUNK), pos, 0
            view = memoryview(buf)
        if rel + _HEAD <= len(buf):
            magic, length, crc = frame_unpack(buf, rel)
            stop = pos + _HEAD + length
            if magic == magic_ok and length >= min_body and stop <= size:
                end = rel + _HEAD + length
                if end <= len(buf):
                    good = crc32(view[rel + _HEAD:end]) == crc
                elif _HEAD + length <= CHUNK:
                    buf, base = _read_at(f, pos, CHUNK), pos
                    view = memoryview(buf)
                    continue
                elif (stop == size or _read_at(f, stop, 4) == magic_ok) and streamed + length <= 2 * size:
                    # a body larger than the window is only checksummed where a frame plausibly ends, and
                    # within a budget: planted headers claiming huge bodies cannot make the scan quadratic
                    streamed += length
                    good = _crc_streamed(f, view[rel + _HEAD:], base + len(buf), stop, crc)
                else:
                    good = False
                if good:
                    index, kind, digest, seconds = fields_unpack(buf, rel + _HEAD)
                    if kind == ok_kind:
                        records += 1
                        if not usable:
                            old += 1
                        elif grid is not None and index < len(grid) and grid[index] == digest:
                            at_index.put(index, journal | pos, _HEAD + length)
                        elif digest not in ok:
                            ok[digest] = (journal | pos) << 32 | (_HEAD + length)
                        unfinished.discard(index)
                    elif kind == started_kind:
                        payload = bytes(view[rel + _FIXED:end]) if end <= len(buf) else b""
                        batch = cachemod.JobRecord(index, kind, digest, seconds, payload).batch()
                        unfinished = set(batch)
                    else:
                        if kind == failed_kind:
                            records += 1
                            payload = bytes(view[rel + _FIXED:end]) if end <= len(buf) else b""
                            failed[digest] = cachemod.JobRecord(index, kind, digest, seconds, payload)
                        unfinished.discard(index)
                    pos = stop
                    continue
        following, buf, base = _find_magic(f, buf, base, pos + 1, size)
        view = memoryview(buf)
        if following < 0:
            skipped += size - pos
            tail = True
            break
        skipped += following - pos
        pos = following
    if skipped:
        where = "a torn tail (a killed writer)" if tail and skipped < _HEAD + 64 else "damaged bytes"
        log.warning("%s: skipped %d bytes of %s; the jobs they held will be recomputed", path, skipped, where)
    scan.records += records
    scan.old_format += old
    info.in_flight = next((i for i in batch if i in unfinished), None) if batch else None
    return info


def _read_at(f, pos, n):
    f.seek(pos)
    return f.read(n)


def _crc_streamed(f, head, pos, stop, crc):
    """The CRC of a body too big for the window: ``head`` is its part already read, the rest comes in chunks."""
    value = zlib.crc32(head)
    f.seek(pos)
    scratch = bytearray(min(CHUNK, stop - pos))
    chunk = memoryview(scratch)
    while pos < stop:
        n = f.readinto(chunk[:min(len(chunk), stop - pos)])
        if not n:
            return False
        value = zlib.crc32(chunk[:n], value)
        pos += n
    return value == crc


def _find_magic(f, buf, base, start, size):
    """The next frame magic at or after ``start`` (-1: none before the end), reading on as needed."""
    magic = cachemod._FRAME_MAGIC
    while True:
        rel = start - base
        if 0 <= rel < len(buf):
            found = buf.find(magic, rel)
            if found >= 0:
                return base + found, buf, base
            if base + len(buf) >= size:
                return -1, buf, base
            start = max(start, base + len(buf) - len(magic) + 1)
        elif start >= size:
            return -1, buf, base
        buf, base = _read_at(f, start, CHUNK), start
        if not buf:
            return -1, buf, base


# -- reading one value ---------------------------------------------------------------------------------------------

def read_value(location, file=None):
    """The value of one ok record, unpickled; ``file`` is the journal already open, if the caller keeps it open.

    Its arrays are views into the record's bytes just read (one allocation per record, no copy of their data).
    Damage raises ``DamagedRecord``; what unpickling raises (a class that no longer exists) propagates."""
    frame = _read_frame(location, file)
    try:
        pickled = decode_payload(memoryview(frame)[_FIXED:])
    except ValueError as exc:
        raise _damaged(location, str(exc)) from None
    return pickled.load()


class OpenJournals:
    """Journals kept open while many results are read in a row (the output stream): small journals are read
    whole once (results of cheap jobs are tiny, and one syscall each would dominate), up to ``budget`` bytes in
    all; larger ones are read a frame at a time."""

    def __init__(self, budget=64 * 2**20):
        self._budget = budget
        self._data = {}
        self._files = {}

    def read_value(self, location):
        journal = location.journal
        data = self._data.get(journal)
        if data is None:
            f = self._files.get(journal)
            if f is None:
                try:
                    f = open(journal, "rb", buffering=0)  # noqa: SIM115 - kept open across calls, closed in close()
                except FileNotFoundError:
                    raise DamagedRecord(f"the journal {journal} holding a stored result is gone; rerun to "
                                        "recompute the result") from None
                size = os.fstat(f.fileno()).st_size
                if size <= self._budget:
                    self._budget -= size
                    data = self._data[journal] = f.read()
                    f.close()
                else:
                    self._files[journal] = f
        if data is not None:
            return _load_frame(location, bytearray(data[location.offset:location.offset + location.length]))
        return read_value(location, f)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._data.clear()


def _load_frame(location, frame):
    _check_frame(location, frame, len(frame))
    try:
        pickled = decode_payload(memoryview(frame)[_FIXED:])
    except ValueError as exc:
        raise _damaged(location, str(exc)) from None
    return pickled.load()


def set_aside(location):
    """A stored result that no longer loads: its frame magic is overwritten, so every later scan skips it (as
    damage) and its job is computed again, instead of failing at the end of every run."""
    try:
        fd = os.open(location.journal, os.O_WRONLY)
        try:
            os.pwrite(fd, b"MTJ\x00", location.offset)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not set aside the record at %s:%d (%s); delete %s to recompute it", location.journal,
                    location.offset, exc, location.journal)


def _read_frame(location, file=None):
    journal, offset, length = location
    if length < _FIXED:
        raise _damaged(location, f"a frame of {length} bytes is shorter than its header")
    frame = bytearray(length)
    try:
        if file is None:
            with open(journal, "rb", buffering=0) as f:
                n = _pread_into(f, frame, offset)
        else:
            n = _pread_into(file, frame, offset)
    except FileNotFoundError:
        raise DamagedRecord(f"the journal {journal} holding a stored result is gone; rerun to recompute "
                            "the result") from None
    _check_frame(location, frame, n)
    return frame


def _check_frame(location, frame, n):
    length = location.length
    if length < _FIXED:
        raise _damaged(location, f"a frame of {length} bytes is shorter than its header")
    if n != length:
        raise _damaged(location, f"the file ends {length - n} bytes early")
    magic, body_length, crc = cachemod._FRAME.unpack_from(frame, 0)
    if magic != cachemod._FRAME_MAGIC:
        raise _damaged(location, "no frame starts there")
    if body_length + _HEAD != length:
        raise _damaged(location, f"the frame holds {body_length + _HEAD} bytes, not {length}")
    if zlib.crc32(memoryview(frame)[_HEAD:]) != crc:
        raise _damaged(location, "its checksum does not match")
    kind = cachemod._FIELDS.unpack_from(frame, _HEAD)[1]
    if kind != cachemod.OK:
        raise _damaged(location, f"it is not a result record (kind {kind})")


def _pread_into(f, buffer, offset):
    view = memoryview(buffer)
    total = 0
    fd = f.fileno()
    while total < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[total:]], offset + total)
        else:
            f.seek(offset + total)
            n = f.readinto(view[total:])
        if not n:
            break
        total += n
    return total


def _damaged(location, what):
    return DamagedRecord(f"the stored result at byte {location.offset} of {location.journal} is damaged "
                         f"({what}); rerun to recompute it")


# -- the persistent store ------------------------------------------------------------------------------------------

def store_dir_for(output):
    return os.path.abspath(os.fspath(output)) + STORE_SUFFIX


class ResultStore:
    """``<output>.cache/``: the finished results of one output path, kept across runs until discarded.

    Journals of finished runs move in whole (their frames are never rewritten, except by ``compact``);
    ``index.bin`` and ``args.pkl`` describe the last finished grid, so any process reads its results lazily."""

    def __init__(self, output):
        output = os.fspath(output)
        if not output:
            raise UsageError("the output path is empty; give a file name such as 'results.pkl'")
        self.output = os.path.abspath(output)
        self.path = self.output + STORE_SUFFIX

    def _file(self, name):
        return os.path.join(self.path, name)

    def exists(self):
        return os.path.isdir(self.path)

    def journal_paths(self):
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.path, n) for n in names
                      if n.startswith(cachemod.JOURNAL_PREFIX) and n.endswith(cachemod.JOURNAL_SUFFIX))

    def read_meta(self):
        return cachemod._read_json(self._file(STORE_META))

    def write_meta(self, code, function_name=""):
        meta = {"format": cachemod.FORMAT_VERSION, "code": code, "function": function_name, "updated": time.time()}
        cachemod.atomic_write_bytes(self._file(STORE_META), json.dumps(meta).encode())

    def adopt(self, journal_paths):
        """Move finished journals in (a rename: nothing is copied on one file system); {old path: new path}."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the result store {self.path}: {exc.strerror}") from exc
        moved, sources = {}, set()
        for src in journal_paths:
            dest = self._file(os.path.basename(src))
            while os.path.exists(dest):
                dest = self._file(_new_journal_name("a"))
            try:
                os.rename(src, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy_durably(src, dest)
                os.unlink(src)
            moved[src] = dest
            sources.add(os.path.dirname(os.path.abspath(src)))
        if moved:
            for directory in (self.path, *sources):
                _fsync_dir(directory)
        return moved

    # -- the index of the last finished grid -------------------------------------------------------------------
    def write_index(self, locations, args):
        """``args.pkl`` (the argument list) then ``index.bin`` (where each job's result is), each atomically;
        the index carries the hash of ``args.pkl``, so a crash between the two is detected, not misread."""
        data = cachemod.dumps(list(args))
        cachemod.atomic_write_bytes(self._file(ARGS), data)
        self._write_index_file(locations, hashlib.blake2b(data, digest_size=16).digest())

    def _write_index_file(self, locations, args_hash):
        names, numbers = [], {}
        entries = bytearray(_INDEX_ENTRY.size * len(locations))
        pack = _INDEX_ENTRY.pack_into
        for i, (journal, offset, length) in enumerate(locations):
            number = numbers.get(journal)
            if number is None:
                number = numbers[journal] = len(names)
                names.append(journal)
            pack(entries, i * _INDEX_ENTRY.size, number, offset, length)
        table = []
        for journal in names:
            if os.path.dirname(os.path.abspath(journal)) == self.path:
                journal = os.path.basename(journal)
            name = os.fsencode(journal)
            table += (_INDEX_NAME.pack(len(name)), name)
        head = _INDEX_HEAD.pack(_INDEX_MAGIC, cachemod.FORMAT_VERSION, len(names), len(locations), args_hash)
        cachemod.atomic_write_bytes(self._file(INDEX), b"".join([head, *table, entries]))

    def has_index(self):
        """Whether a readable index of a finished grid is here."""
        try:
            self.read_index()
        except (OSError, ValueError, CacheError):
            return False
        return True

    def read_index(self):
        """(journal paths, ``IndexReader``: the location of each job's result). Raises FileNotFoundError when
        there is no index and ``DamagedRecord`` when it does not check out."""
        with open(self._file(INDEX), "rb") as f:
            data = f.read()
        return self._parse_index(data)

    def _parse_index(self, data):
        def damaged(what):
            return DamagedRecord(f"the result index {self._file(INDEX)} is damaged ({what}); rerun to rewrite it")

        if len(data) < _INDEX_HEAD.size:
            raise damaged("too short")
        magic, version, njournals, njobs, args_hash = _INDEX_HEAD.unpack_from(data, 0)
        if magic != _INDEX_MAGIC or version != cachemod.FORMAT_VERSION:
            raise damaged(f"not a format-{cachemod.FORMAT_VERSION} index")
        pos, paths = _INDEX_HEAD.size, []
        for _ in range(njournals):
            if pos + _INDEX_NAME.size > len(data):
                raise damaged("the journal table is cut short")
            (length,) = _INDEX_NAME.unpack_from(data, pos)
            pos += _INDEX_NAME.size
            if pos + length > len(data):
                raise damaged("the journal table is cut short")
            paths.append(os.path.join(self.path, os.fsdecode(data[pos:pos + length])))
            pos += length
        if len(data) - pos != njobs * _INDEX_ENTRY.size:
            raise damaged(f"{len(data) - pos} bytes of entries for {njobs} jobs")
        return paths, IndexReader(paths, memoryview(data)[pos:], njobs, args_hash, damaged)

    def read_args(self, index=None):
        """The argument list of the indexed grid (``args.pkl``), checked against the index's hash of it."""
        index = self.read_index()[1] if index is None else index
        with open(self._file(ARGS), "rb") as f:
            data = f.read()
        if hashlib.blake2b(data, digest_size=16).digest() != index.args_hash:
            raise DamagedRecord(f"{self._file(ARGS)} does not belong to this result index: a later run of "
                                f"{self.output} replaced the results since they were loaded (call load() again), "
                                "or a run stopped while writing them (rerun to rewrite both)")
        args = pickle.loads(data)
        if not isinstance(args, list) or len(args) != len(index):
            raise DamagedRecord(f"{self._file(ARGS)} does not hold {len(index)} arguments; rerun to rewrite it")
        return args

    def discard(self):
        """Remove every stored result of this output (``force``): renamed away in one step first, so an
        interrupted removal never leaves half a store."""
        trash = f"{self.path}.discarded-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, trash)
        except FileNotFoundError:
            return
        try:
            shutil.rmtree(trash)
        except OSError as exc:
            log.warning("the discarded results %s could not all be removed (%s); delete the directory by hand",
                        trash, exc)

    def compact(self, keep, scan):
        """Keep only the ok records of the digests in ``keep`` (all of ``scan.ok`` when None): their frames are
        copied byte for byte into one new journal, made durable, and then every other journal is deleted.

        An existing index is rewritten to the new places (or removed, if it named a result not kept). Returns
        the new ``{digest: Location}``."""
        chosen = sorted(((loc, digest) for digest, loc in scan.ok.items() if keep is None or digest in keep),
                        key=lambda item: (item[0].journal, item[0].offset))
        old = self.journal_paths()
        os.makedirs(self.path, exist_ok=True)
        final = self._file(_new_journal_name("c"))
        tmp = self._file(f".{os.path.basename(final)}.tmp")
        moved, new = {}, {}
        try:
            with open(tmp, "wb") as out:
                codes = {cachemod.journal_code(journal) for (journal, _, _), _ in chosen}
                out.write(_journal_header_line(codes.pop() if len(codes) == 1 else None))
                pos = out.tell()
                for (journal, offset, length), digest in chosen:
                    moved[(journal, offset)] = new[digest] = Location(final, pos, length)
                    pos += length
                _copy_frames(out, [loc for loc, _ in chosen])
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, final)
        except BaseException:
            cachemod._unlink_quietly(tmp)
            raise
        _fsync_dir(self.path)
        self._remap_index(moved)
        for path in old:
            if path != final:
                cachemod._unlink_quietly(path)
        _fsync_dir(self.path)
        log.info("%s: kept %d results in one journal, removed %d journals", self.path, len(new), len(old))
        return new

    def _remap_index(self, moved):
        try:
            paths, index = self.read_index()
        except FileNotFoundError:
            return
        except DamagedRecord:
            index = None
        locations = []
        if index is not None:
            for i in range(len(index)):
                loc = index[i]
                new = moved.get((loc.journal, loc.offset))
                if new is None:
                    index = None
                    break
                locations.append(new)
        if index is None:
            log.info("%s: the result index named results that were pruned; removing it", self.path)
            cachemod._unlink_quietly(self._file(INDEX))
            return
        self._write_index_file(locations, index.args_hash)


class IndexReader:
    """The location of each job's result, decoded on access from ``index.bin``'s entries (20 bytes a job)."""

    def __init__(self, paths, entries, njobs, args_hash, damaged):
        self.paths, self._entries, self._n, self.args_hash, self._damaged = paths, entries, njobs, args_hash, damaged

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if not 0 <= i < self._n:
            raise IndexError(i)
        number, offset, length = _INDEX_ENTRY.unpack_from(self._entries, i * _INDEX_ENTRY.size)
        if number >= len(self.paths):
            raise self._damaged(f"job {i} names journal {number} of {len(self.paths)}")
        return Location(self.paths[number], offset, length)


def _new_journal_name(tag):
    return f"{cachemod.JOURNAL_PREFIX}{tag}-{secrets.token_hex(6)}{cachemod.JOURNAL_SUFFIX}"


def _journal_header_line(code=None):
    """A merged journal keeps the code of its records when they share one (else None: "unknown")."""
    writer = {"rank": None, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "code": code}
    return (cachemod.JOURNAL_MAGIC_LINE % cachemod.FORMAT_VERSION)[:-1] + b" " + json.dumps(writer).encode() + b"\n"


def _copy_frames(out, locations):
    """Copy frames in order, merging neighbours of one journal into one range."""
    ranges = []
    for journal, offset, length in locations:
        if ranges and ranges[-1][0] == journal and ranges[-1][1] + ranges[-1][2] == offset:
            ranges[-1][2] += length
        else:
            ranges.append([journal, offset, length])
    src, src_path = None, None
    try:
        for journal, offset, length in ranges:
            if journal != src_path:
                if src is not None:
                    src.close()
                src, src_path = open(journal, "rb", buffering=0), journal  # noqa: SIM115 - closed below
            scratch = bytearray(min(CHUNK, length))
            while length:
                n = _pread_into(src, memoryview(scratch)[:min(CHUNK, length)], offset)
                if not n:
                    raise DamagedRecord(f"{journal} ends before byte {offset}, where a kept result was; "
                                        "rerun to recompute it")
                out.write(memoryview(scratch)[:n])
                offset += n
                length -= n
    finally:
        if src is not None:
            src.close()


def _copy_durably(src, dest):
    tmp = f"{dest}.tmp-{secrets.token_hex(3)}"
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        os.rename(tmp, dest)
    except BaseException:
        cachemod._unlink_quietly(tmp)
        raise


def _fsync_dir(path):
    """Make renames and unlinks in a directory durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- lazy results --------------------------------------------------------------------------------------------------

KINDS = ("triples", "values")
_REPR_EDGE = 3
_REPR_WHOLE = 100


class Results(collections.abc.Sequence):
    """A finished run's results, read from ``<output>.cache/`` one record at a time when accessed.

    Items are ``(index, [arg], value)`` (``kind="triples"``, the blog post's format) or the bare values
    (``kind="values"``). ``args`` spares reading ``args.pkl`` when the caller has the list in memory. Compares
    equal to any sequence with equal items; pickles as a plain list (a snapshot: the receiver needs no file
    system and sees no later run's changes). Never imports mpi4py."""

    def __init__(self, output, args=None, kind="triples"):
        if kind not in KINDS:
            raise UsageError(f"kind must be one of {KINDS}, not {kind!r}")
        self._store = ResultStore(output)
        try:
            _paths, self._index = self._store.read_index()
        except FileNotFoundError:
            raise CacheError(f"no stored results for {self._store.output} (no {INDEX} in {self._store.path}); "
                             "run the map first, or read the output file with pickle") from None
        if args is not None and len(args) != len(self._index):
            raise CacheError(f"the result index in {self._store.path} holds {len(self._index)} jobs, not "
                             f"{len(args)}: another run of this output changed it since; rerun the map")
        self._args = args
        self._kind = kind
        self._files = collections.OrderedDict()

    @property
    def output(self):
        return self._store.output

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        try:
            i = i.__index__()
        except AttributeError:
            raise TypeError(f"Results indices must be integers or slices, not {type(i).__name__}") from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("Results index out of range")
        return self._item(i)

    def _item(self, i):
        location = self._index[i]
        value = read_value(location, self._file(location.journal))
        if self._kind == "values":
            return value
        if self._args is None:
            self._args = self._store.read_args(self._index)
        return (i, [self._args[i]], value)

    def _file(self, path):
        f = self._files.pop(path, None)
        if f is None:
            try:
                f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open for later reads (LRU)
            except FileNotFoundError:
                raise DamagedRecord(f"the journal {path} holding stored results is gone (another run pruned or "
                                    "discarded them); rerun to recompute them") from None
            while len(self._files) >= OPEN_JOURNALS:
                self._files.popitem(last=False)[1].close()
        self._files[path] = f
        return f

    def __iter__(self):
        for i in range(len(self)):
            yield self._item(i)

    def __eq__(self, other):
        if not isinstance(other, collections.abc.Sequence) or isinstance(other, (str, bytes, bytearray)):
            return NotImplemented
        if len(self) != len(other):
            return False
        return all(a is b or a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

    def __repr__(self):
        n = len(self)
        if n <= _REPR_WHOLE:                     # printed as the list it stands for, as the blog post's was
            return repr(self.to_list())
        head = [repr(self[i]) for i in range(_REPR_EDGE)]
        tail = [repr(self[i]) for i in range(n - _REPR_EDGE, n)]
        return f"[{', '.join(head)}, ..., {', '.join(tail)}] ({n} items)"

    def to_list(self):
        return list(self)

    def __reduce__(self):
        return (list, (self.to_list(),))

    def close(self):
        while self._files:
            self._files.popitem()[1].close()

    def __del__(self):
        files = getattr(self, "_files", None)
        while files:
            files.popitem()[1].close()


def load(output, kind="triples"):
    """The results of a finished run of ``output``: a lazy ``Results`` when its store indexes that very output
    (or the output file is gone), else the list read from the output file (an older version's, the blog post's).

    ``kind="values"`` gives the bare values instead of ``(index, [arg], value)``."""
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {KINDS}, not {kind!r}")
    output = os.path.abspath(os.fspath(output))
    if _index_describes(output):
        return Results(output, kind=kind)
    with open(output, "rb") as f:
        data = pickle.load(f)
    triples = data if len(data) > 1 else data[0]
    return triples if kind == "triples" else [value for _index, _arg, value in triples]


def _index_describes(output):
    """The store's index is for this output: the output is gone, or ``.code.json`` names its size and mtime."""
    if not os.path.exists(os.path.join(store_dir_for(output), INDEX)):
        return False
    try:
        st = os.stat(output)
    except FileNotFoundError:
        return True
    identity = (cachemod.RunCache(output).read_meta() or {}).get("output_identity")
    return identity == [st.st_size, st.st_mtime_ns]


# -- the output file, streamed -------------------------------------------------------------------------------------

class _Streamed:
    """Pickles as a list whose items come one at a time from an iterator (pickle's listitems)."""

    def __init__(self, items):
        self._items = items

    def __reduce_ex__(self, protocol):
        return (list, (), None, self._items)


class _Expanding(Exception):
    """A value whose memo-less pickle grows far beyond its stored size (shared parts written once per use)."""


class _CountingFile:
    """The output file, counting what the streaming pickler writes so a value that expands can be caught."""

    def __init__(self, f):
        self._f, self.count, self.limit = f, 0, None

    def write(self, data):
        self.count += memoryview(data).nbytes          # the pickler hands big buffers over as PickleBuffers
        if self.limit is not None and self.count > self.limit:
            raise _Expanding(f"a value grew past {self.limit} bytes without pickle's memo")
        return self._f.write(data)


def write_output(output, n, triple_at, size_at=None):
    """The blog post's output, ``([(index, [arg], value), ...],)``, written atomically and streamed: one triple at
    a time from ``triple_at(i)``, so memory holds one result at a time and big arrays go straight to the file.

    The stream pickles without a memo (pickle's fast mode); a value it cannot carry that way (a cycle, a
    notebook class), or one that grows past four times its stored size plus 1 MiB (``size_at(i)``: parts it
    shares would be written once per use, exponentially for nested sharing), makes it start over the eager
    way, one list in memory. What ``triple_at`` raises propagates."""
    output = os.fspath(output)
    directory = os.path.dirname(os.path.abspath(output))
    tmp = os.path.join(directory, f".{os.path.basename(output)}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    source_failed = []

    counting = []

    def items():
        for i in range(n):
            try:
                item = triple_at(i)
            except BaseException:
                source_failed.append(True)
                raise
            if size_at is not None and counting:
                counting[0].limit = counting[0].count + 4 * size_at(i) + 2**20
            yield item

    try:
        try:
            with open(tmp, "wb") as raw:
                f = _CountingFile(raw)
                counting.append(f)
                pickler = pickle.Pickler(f, protocol=PROTOCOL)
                pickler.fast = True
                pickler.dump((_Streamed(items()),))
                raw.flush()
                os.fsync(raw.fileno())
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - any pickling failure of the stream is retried the eager way
            if source_failed:
                raise
            log.info("%s: cannot stream the output (%s: %s); writing it from a list in memory", output,
                     type(exc).__name__, exc)
            data = cachemod.dumps(([triple_at(i) for i in range(n)],))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            del data
        os.replace(tmp, output)
    except BaseException:
        cachemod._unlink_quietly(tmp)
        raise


__all__ = ["Encoded", "encode_value", "decode_payload", "Location", "LocationMap", "Scan", "scan_journals",
           "read_value", "DamagedRecord", "set_aside", "ResultStore", "IndexReader", "Results", "load", "write_output"]

