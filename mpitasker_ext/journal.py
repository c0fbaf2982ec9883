"""The journal, format 3: what a record is, and how one process appends its records.

Journals, not a file per job: creating a file costs ~0.7 ms here while appending a frame costs ~3 us, and a
million files in one directory is its own outage. Each process appends to its own file (no locks), one write per
record straight to the OS, so a killed process loses nothing it finished. Reading them is ``scan``'s job. See
docs/design.md for the byte layout.
"""

import json
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass

from .files import open_regular

FORMAT_VERSION = 3  # 2: failed/started payloads are JSON/packed indices; 3: ok payloads carry out-of-band buffers
JOURNAL_PREFIX = "journal-"
JOURNAL_SUFFIX = ".bin"
JOURNAL_MAGIC_LINE = b"MPITASKER-JOURNAL %d\n"
READABLE_VERSIONS = (FORMAT_VERSION, 2)  # a format-2 journal is still read; its ok payloads are passed over
FSYNC_INTERVAL = 1.0

FRAME = struct.Struct("<4sII")  # magic, body length, crc32 of body
FIELDS = struct.Struct("<QB16sd")  # job index, kind, args digest, seconds spent
FRAME_MAGIC = b"MTJ\x01"
SET_ASIDE_MAGIC = b"MTJ\x00"  # a frame whose result no longer loads: every scan skips it, as damage
OK, FAILED, STARTED, OK_OUTPUT = 0, 1, 2, 3  # STARTED: a batch about to run; OK_OUTPUT: a result and its output
OK_KINDS = (OK, OK_OUTPUT)  # records that hold a result
MAX_RECORD = (1 << 32) - 1 - 64
FAILURE_FIELDS = ("index", "arg", "error", "traceback")
UNREADABLE_FAILURE = "(failure record unreadable)"
_BATCH_INDEX = struct.Struct("<Q")  # a started record's payload: the batch's job indices, packed
_OUTPUT_LENGTH = struct.Struct("<I")  # an OK_OUTPUT payload starts with the output's length in bytes
_IOV_MAX = 1024  # parts per writev: IOV_MAX on Linux and the BSDs


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One journal record: a finished job (ok or failed) or a started batch; the payload stays encoded.

    Only an ok payload is a pickle, and a record read back never holds one (``payload`` is then empty: results are
    read by their ``Location``). Failed and started payloads are plain data, so anything that merely reads a run
    directory (progress, the dashboard, the CLI) never unpickles bytes someone may have planted there.
    """

    index: int
    kind: int
    digest: bytes
    seconds: float
    payload: bytes

    @property
    def ok(self):
        return self.kind in OK_KINDS

    def failure(self):
        """A failed record's dict (index, arg, error, traceback, and rank, host and output when it has them);
        damage reads as an unreadable failure, never as an exception, since a view must still show that the job
        failed."""
        try:
            info = json.loads(self.payload.decode("utf-8")) if self.kind == FAILED else None
        except (UnicodeDecodeError, ValueError, RecursionError):
            info = None
        if (isinstance(info, dict) and type(info.get("index")) is int and info["index"] == self.index
                and all(isinstance(info.get(key), str) for key in FAILURE_FIELDS[1:])):
            return {**{key: info[key] for key in FAILURE_FIELDS}, **_failure_place(info), **_failure_output(info)}
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


class RecordTooLarge(ValueError):
    """A job result beyond what one journal frame can hold (4 GiB)."""

    def __init__(self, size):
        super().__init__(f"the result pickles to {size / 2**30:.1f} GiB, more than a journal record holds "
                         f"({MAX_RECORD / 2**30:.1f} GiB): save it to a file in the job and return the path")


def encode_record(index, kind, digest, seconds, payload):
    body = FIELDS.pack(index, kind, digest, seconds) + payload
    if len(body) > MAX_RECORD:
        raise RecordTooLarge(len(payload))
    return FRAME.pack(FRAME_MAGIC, len(body), zlib.crc32(body)) + body


def encode_failure(info):
    """A failed record's payload: UTF-8 JSON of index, arg (short repr), error line, traceback, the rank and
    host the job ran on, and what it printed (only when it printed)."""
    record = {"index": int(info["index"]), **{key: str(info.get(key, "")) for key in FAILURE_FIELDS[1:]}}
    return json.dumps({**record, **_failure_place(info), **_failure_output(info)}).encode("utf-8")


def _failure_place(info):
    """The record's ``rank`` (an int) and ``host`` (text), those it has: older records have neither."""
    place = {}
    if type(info.get("rank")) is int:
        place["rank"] = info["rank"]
    if isinstance(info.get("host"), str):
        place["host"] = info["host"]
    return place


def _failure_output(info):
    """The record's ``output`` when it is text that says something: older records, jobs that printed nothing
    and planted records with anything else have none."""
    output = info.get("output")
    return {"output": output} if isinstance(output, str) and output else {}


def encode_output_prefix(text):
    """What an OK_OUTPUT payload starts with: the output's length in bytes (u32 LE), then the output as UTF-8
    (text that is not valid Unicode, lone surrogates, is kept backslash-escaped). The ok payload follows."""
    data = text.encode("utf-8", errors="backslashreplace")
    return _OUTPUT_LENGTH.pack(len(data)) + data


def output_prefix_end(payload):
    """Where the ok payload starts in an OK_OUTPUT payload (after its output); ValueError when the output's
    length runs past the payload."""
    if len(payload) < _OUTPUT_LENGTH.size:
        raise ValueError("the payload is shorter than its output's length")
    end = _OUTPUT_LENGTH.size + _OUTPUT_LENGTH.unpack_from(payload, 0)[0]
    if end > len(payload):
        raise ValueError("the output runs past the end of the payload")
    return end


def decode_output_prefix(payload):
    """The output an OK_OUTPUT payload starts with (``payload`` may hold just that prefix). Bytes that are not
    valid UTF-8 (a damaged or planted record) read with replacements: reading an output never fails on its
    bytes, and never touches the pickle after it."""
    return bytes(payload[_OUTPUT_LENGTH.size:output_prefix_end(payload)]).decode("utf-8", errors="replace")


def encode_batch(indices):
    """A started record's payload: the batch's job indices as packed little-endian u64."""
    return struct.pack(f"<{len(indices)}Q", *indices)


# -- the header line -----------------------------------------------------------------------------------------------

def header_line(rank=None, code=None):
    """The first line of a journal: who writes it, and the fingerprint of the code that computes its results
    (None for a journal merged from several codes: "unknown")."""
    writer = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "code": code}
    return (JOURNAL_MAGIC_LINE % FORMAT_VERSION)[:-1] + b" " + json.dumps(writer).encode() + b"\n"


def parse_header(data):
    """(format, writer info) of the journal whose first bytes are ``data``; (None, None) when it is not one of
    ours, or of a format no longer read. A damaged writer info reads as ``{}``."""
    line_end = data.find(b"\n", 0, 4096)
    if line_end < 0:
        return None, None
    line = bytes(data[:line_end + 1])
    for version in READABLE_VERSIONS:
        prefix = JOURNAL_MAGIC_LINE % version
        if line == prefix:
            return version, {}
        if line.startswith(prefix[:-1] + b" "):
            try:
                info = json.loads(line[len(prefix):])
            except (ValueError, RecursionError):  # deep nesting raises RecursionError: damage, like any other
                return version, {}
            return version, info if isinstance(info, dict) else {}
    return None, None


def journal_code(path):
    """The code fingerprint a format-3 journal's header names (None when unknown: an older or a merged journal)."""
    try:
        with open_regular(path) as f:
            version, info = parse_header(f.read(4096))
    except OSError:
        return None
    if version != FORMAT_VERSION:
        return None
    return info.get("code") if isinstance(info.get("code"), str) else None


def journals_in(directory):
    """The journals in ``directory``, sorted; none when it does not exist."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(directory, n) for n in names
                  if n.startswith(JOURNAL_PREFIX) and n.endswith(JOURNAL_SUFFIX))


# -- writing -------------------------------------------------------------------------------------------------------

class JournalWriter:
    """Append-only journal of one process: no locks needed, a kill loses nothing already written."""

    def __init__(self, path, rank=None, fsync_interval=FSYNC_INTERVAL, code=None):
        self.path = path
        self._fsync_interval = fsync_interval
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._last_sync = time.monotonic()
        self._write(header_line(rank, code))

    def append(self, index, ok, digest, seconds, payload):
        """One finished job, in one write() straight to the OS."""
        self._write(encode_record(index, OK if ok else FAILED, digest, seconds, payload))
        self._maybe_sync()

    def append_value(self, index, digest, seconds, encoded, output=None):
        """One finished job's result (``payload.encode_value``): framed as ``encode_record`` does, the CRC taken
        over the parts in turn and everything written with one ``writev``, so an array's bytes are never copied.
        A job that printed (``output``) is an OK_OUTPUT record: its output goes before the ok payload."""
        prefix = encode_output_prefix(output) if output else b""
        length = FIELDS.size + len(prefix) + encoded.size
        if length > MAX_RECORD:
            raise RecordTooLarge(encoded.size)
        fields = FIELDS.pack(index, OK_OUTPUT if prefix else OK, digest, seconds) + prefix
        parts = encoded.parts()
        crc = zlib.crc32(fields)
        for part in parts:
            crc = zlib.crc32(part, crc)
        self._writev([FRAME.pack(FRAME_MAGIC, length, crc) + fields, *parts])
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


__all__ = ["FORMAT_VERSION", "OK", "FAILED", "STARTED", "OK_OUTPUT", "OK_KINDS", "MAX_RECORD", "JobRecord",
           "JournalInfo", "RecordTooLarge", "encode_record", "encode_failure", "encode_output_prefix",
           "output_prefix_end", "decode_output_prefix", "encode_batch", "header_line", "parse_header",
           "journal_code", "journals_in", "JournalWriter"]
