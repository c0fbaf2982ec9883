"""Reading journals without unpickling: the one walk over their frames, and what it finds.

A scan reads frame headers, fixed fields and checksums in 4 MiB windows; an ok payload is never held and never
unpickled (progress views scan journals anyone may have planted). Damage is a miss, never a crash: a frame whose
magic, length or CRC does not check out is skipped by searching for the next magic, with one warning per file.
Reading a result's value is ``payload.read_value``'s job, given the ``Location`` a scan found.
"""

import array
import collections.abc
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from .files import open_regular
from .journal import (
    FAILED,
    FIELDS,
    FORMAT_VERSION,
    FRAME,
    FRAME_MAGIC,
    OK_KINDS,
    OK_OUTPUT,
    SET_ASIDE_MAGIC,
    STARTED,
    JobRecord,
    JournalInfo,
    decode_output_prefix,
    parse_header,
)

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # a scan reads this much at a time
_HEAD = FRAME.size
_FIXED = _HEAD + FIELDS.size
_OFFSET_MASK = (1 << 48) - 1
_FRAME_STARTS = (FRAME_MAGIC, SET_ASIDE_MAGIC)  # what may follow a frame: another, or one set aside


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


def scan_journals(paths, grid=None):
    """Find every record in these journals without unpickling anything or holding a payload in memory.

    With ``grid`` (the current run's digests, by job index), an ok record written for job i of this very grid is
    kept by index in ``Scan.at_index`` (12 bytes a job) rather than in the digest mapping (~120 bytes a record):
    what a run just computed costs rank 0 little memory."""
    scan = Scan()
    if grid is not None:
        scan.at_index = _IndexLocations(scan.ok, grid)
    interrupted = []
    for path in paths:
        try:
            with open_regular(path) as f:     # a FIFO or a symlink planted as a journal is refused
                mtime = os.fstat(f.fileno()).st_mtime
                info = _scan_file(path, f, scan)
        except OSError as exc:
            _unreadable(path, exc)
            continue
        if info is not None and info.in_flight is not None:
            interrupted.append((mtime, info))
    for digest in scan.ok._codes.keys() & scan.failed.keys():
        del scan.failed[digest]
    if scan.at_index is not None:
        for digest in [d for d, rec in scan.failed.items() if scan.at_index.holds(rec.index, d)]:
            del scan.failed[digest]
    scan.interrupted = [info for _, info in sorted(interrupted, key=lambda item: item[0])]
    return scan


def _scan_file(path, f, scan):
    """One journal into ``scan``; returns its writer info with the job in flight, or None if not a journal."""
    version, header, frames = _journal(path, f)
    if version is None:
        return None
    info = JournalInfo(path, header.get("rank"), header.get("pid"), header.get("host", ""))
    usable = version == FORMAT_VERSION
    ok, failed = scan.ok._codes, scan.failed
    at_index = scan.at_index
    grid = at_index.grid if at_index is not None else None
    journal = len(scan.ok._paths) << 48
    scan.ok._paths.append(path)
    batch, unfinished = None, set()
    records = old = 0
    for pos, length, index, kind, digest, seconds, payload in frames:
        if kind in OK_KINDS:
            records += 1
            if not usable:
                old += 1
            elif grid is not None and index < len(grid) and grid[index] == digest:
                at_index.put(index, journal | pos, length)
            elif digest not in ok:
                ok[digest] = (journal | pos) << 32 | length
            unfinished.discard(index)
        elif kind == STARTED:
            batch = JobRecord(index, kind, digest, seconds, payload).batch()
            unfinished = set(batch)
        else:
            if kind == FAILED:
                records += 1
                failed[digest] = JobRecord(index, kind, digest, seconds, payload)
            unfinished.discard(index)
    scan.records += records
    scan.old_format += old
    info.in_flight = next((i for i in batch if i in unfinished), None) if batch else None
    return info


def journal_records(path):
    """Every valid record of one journal, in file order, from the same walk as ``scan_journals``. An ok record's
    payload is not read (it reads as ``b""``: a value is read by its ``Location``), and a format-2 journal's ok
    records are passed over. An unreadable journal yields nothing, with a warning."""
    try:
        with open_regular(path) as f:
            version, _header, frames = _journal(path, f)
            for _pos, _length, index, kind, digest, seconds, payload in frames:
                if kind not in OK_KINDS:
                    yield JobRecord(index, kind, digest, seconds, payload)
                elif version == FORMAT_VERSION:
                    yield JobRecord(index, kind, digest, seconds, b"")
    except OSError as exc:
        _unreadable(path, exc)


def job_records(path, index):
    """(writer info from the header line, ``[(JobRecord, Location)]``): the finished records of job ``index`` in
    one journal, in file order, from the same walk. An ok record's payload is not read (its output is read by
    ``read_output``); a failed one's (small JSON) is kept. Nothing when the file is not a format-3 journal."""
    found = []
    try:
        with open_regular(path) as f:
            version, header, frames = _journal(path, f)
            for pos, length, rec_index, kind, digest, seconds, payload in frames:
                if rec_index != index or kind == STARTED or version != FORMAT_VERSION:
                    continue
                record = JobRecord(index, kind, digest, seconds, b"" if kind in OK_KINDS else payload)
                found.append((record, Location(path, pos, length)))
    except OSError as exc:
        _unreadable(path, exc)
        return {}, []
    return header or {}, found


def read_output(location):
    """What the job of the ok record at ``location`` printed ('' for a record without output, kind 0), read from
    the prefix before its pickle: the pickle is never read into a value. The frame's checksum is checked (in
    chunks, so a large result costs no more memory than a window); damage raises ``ValueError``."""
    journal, offset, length = location
    with open_regular(journal) as f:
        f.seek(offset)
        head = f.read(min(length, CHUNK))
        if len(head) < _FIXED:
            raise ValueError(f"no whole record at byte {offset} of {journal}")
        magic, body_length, crc = FRAME.unpack_from(head, 0)
        if magic != FRAME_MAGIC or body_length + _HEAD != length:
            raise ValueError(f"no record starts at byte {offset} of {journal}")
        kind = FIELDS.unpack_from(head, _HEAD)[1]
        if kind not in OK_KINDS:
            raise ValueError(f"the record at byte {offset} of {journal} is not a result (kind {kind})")
        if not _crc_streamed(f, memoryview(head)[_HEAD:], offset + len(head), offset + length, crc):
            raise ValueError(f"the record at byte {offset} of {journal} is damaged (its checksum does not match)")
    return decode_output_prefix(memoryview(head)[_FIXED:]) if kind == OK_OUTPUT else ""


def _unreadable(path, exc):
    log.warning("journal %s is unreadable (%s); its jobs will be recomputed", path, exc.strerror or exc)


# -- the walk ------------------------------------------------------------------------------------------------------

def _journal(path, f):
    """(format, writer info, its frames) of an open journal; (None, None, ()) when it is not one, with a warning."""
    size = os.fstat(f.fileno()).st_size
    first = f.read(min(size, CHUNK))
    version, header = parse_header(first)
    if version is None:
        if first:
            log.warning("%s: not a format-%d journal (starts with %r); its jobs will be recomputed",
                        path, FORMAT_VERSION, bytes(first[:24]))
        return None, None, ()
    return version, header, _frames(path, f, size, first)


def _frames(path, f, size, first, base=0, pos=None, growing=None):
    """Each valid frame after the header line: (offset, frame length, index, kind, digest, seconds, payload).

    ``payload`` is None for an ok frame (never held), else the bytes of a frame that fits the window (``b""`` for
    a larger one). Bytes that are not a valid frame are skipped up to the next frame magic and reported in one
    warning once the file is read ("torn tail" at its end, "damaged bytes" elsewhere).

    ``growing`` (a list) reads a journal still being written, from ``pos`` (``first`` read at ``base``): a frame
    cut by the end of the file is a write in progress, not damage; its offset is appended to ``growing`` and the
    walk stops there, to go on from it next time."""
    frame_unpack, fields_unpack, crc32 = FRAME.unpack_from, FIELDS.unpack_from, zlib.crc32
    min_body = FIELDS.size
    buf = first
    view = memoryview(buf)
    if pos is None:
        pos = first.find(b"\n") + 1
    skipped, tail, streamed = 0, False, 0
    while pos < size:
        rel = pos - base
        if rel + _FIXED > len(buf) and base + len(buf) < size:
            buf, base, rel = _read_at(f, pos, CHUNK), pos, 0
            view = memoryview(buf)
        if rel + _HEAD <= len(buf):
            magic, length, crc = frame_unpack(buf, rel)
            stop = pos + _HEAD + length
            if growing is not None and magic == FRAME_MAGIC and stop > size:
                growing.append(pos)            # being written: read it whole next time
                return
            if magic == FRAME_MAGIC and length >= min_body and stop <= size:
                end = rel + _HEAD + length
                if end <= len(buf):
                    good = crc32(view[rel + _HEAD:end]) == crc
                elif _HEAD + length <= CHUNK:
                    buf, base = _read_at(f, pos, CHUNK), pos
                    view = memoryview(buf)
                    continue
                elif (stop == size or _read_at(f, stop, 4) in _FRAME_STARTS) and streamed + length <= 2 * size:
                    # a body larger than the window is only checksummed where a frame plausibly ends (the next
                    # frame, maybe one set aside since), and within a budget: planted headers claiming huge
                    # bodies cannot make the scan quadratic
                    streamed += length
                    good = _crc_streamed(f, view[rel + _HEAD:], base + len(buf), stop, crc)
                else:
                    good = False
                if good:
                    index, kind, digest, seconds = fields_unpack(buf, rel + _HEAD)
                    payload = None if kind in OK_KINDS else bytes(view[rel + _FIXED:end]) if end <= len(buf) else b""
                    yield pos, _HEAD + length, index, kind, digest, seconds, payload
                    pos = stop
                    continue
        elif growing is not None:              # the start of a frame header, still being written
            growing.append(pos)
            return
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
    if growing is not None:
        growing.append(size)


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
    while True:
        rel = start - base
        if 0 <= rel < len(buf):
            found = buf.find(FRAME_MAGIC, rel)
            if found >= 0:
                return base + found, buf, base
            if base + len(buf) >= size:
                return -1, buf, base
            start = max(start, base + len(buf) - len(FRAME_MAGIC) + 1)
        elif start >= size:
            return -1, buf, base
        buf, base = _read_at(f, start, CHUNK), start
        if not buf:
            return -1, buf, base


def read_appended(path, start=0, max_records=None):
    """The ok records a journal still being written gained from byte ``start`` on: ``([(index, digest,
    Location)], offset to go on from)``, at most ``max_records`` of them (the rest is for the next call). A frame
    the writer has not finished is left for the next call; damage is skipped with a warning, as everywhere. A file
    that is not a format-3 journal yields nothing, ever."""
    records = []
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if start == 0:
            first = f.read(min(size, CHUNK))
            version, _header = parse_header(first)
            if version is None and b"\n" not in first[:4096] and size < 4096:
                return records, 0                      # the header line is still being written
            if version != FORMAT_VERSION:
                return records, size
            base, pos = 0, None
        else:
            first, base, pos = _read_at(f, start, CHUNK), start, start
        growing = []
        for frame_pos, length, index, kind, digest, _seconds, _payload in _frames(path, f, size, first, base, pos,
                                                                                 growing):
            if kind in OK_KINDS:
                records.append((index, digest, Location(path, frame_pos, length)))
                if max_records is not None and len(records) >= max_records:
                    return records, frame_pos + length          # the rest next time
    return records, growing[0] if growing else size


__all__ = ["Location", "LocationMap", "Scan", "scan_journals", "journal_records", "job_records", "read_output",
           "read_appended"]
