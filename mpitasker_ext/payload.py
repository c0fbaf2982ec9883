"""What is pickled: a result as the format-3 ok payload, and reading one back from where a scan found it.

A result is pickled with protocol 5 and out-of-band buffers, so a numpy array's bytes go from the array to the
journal with one ``writev`` and come back as a view into the bytes read, never copied in between. This is the one
module that unpickles a stored result, and only when someone asks for that value.
"""

import logging
import os
import pickle
import struct
import zlib
from typing import NamedTuple

from .errors import CacheError, UsageError
from .files import pread_into
from .journal import FIELDS, FRAME, FRAME_MAGIC, OK_KINDS, OK_OUTPUT, output_prefix_end

log = logging.getLogger(__name__)

HASH_PROTOCOL = 5
RESULT_PROTOCOL = pickle.HIGHEST_PROTOCOL
PROTOCOL = 5
OUT_OF_BAND_MIN = 4096  # smaller buffers stay inside the pickle: an iovec costs more than copying them

_PAYLOAD_HEAD = struct.Struct("<IQ")  # an ok payload: number of buffers, pickle length
_LENGTH = struct.Struct("<Q")  # before each out-of-band buffer
_HEAD = FRAME.size
_FIXED = _HEAD + FIELDS.size


class DamagedRecord(CacheError):
    """A stored result that cannot be read back as it was written."""


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


# -- reading one value ---------------------------------------------------------------------------------------------

def read_value(location, file=None):
    """The value of one ok record, unpickled; ``file`` is the journal already open, if the caller keeps it open.

    Its arrays are views into the record's bytes just read (one allocation per record, no copy of their data).
    Damage raises ``DamagedRecord``; what unpickling raises (a class that no longer exists) propagates."""
    journal, offset, length = location
    if length < _FIXED:
        raise _damaged(location, f"a frame of {length} bytes is shorter than its header")
    frame = bytearray(length)
    try:
        if file is None:
            with open(journal, "rb", buffering=0) as f:
                n = pread_into(f, frame, offset)
        else:
            n = pread_into(file, frame, offset)
    except FileNotFoundError:
        raise DamagedRecord(f"the journal {journal} holding a stored result is gone; rerun to recompute "
                            "the result") from None
    return load_frame(location, frame, n)


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
            frame = bytearray(data[location.offset:location.offset + location.length])
            return load_frame(location, frame, len(frame))
        return read_value(location, f)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._data.clear()


def load_frame(location, frame, n, checked=False):
    """Check the frame read (``n`` bytes of it) against its location, then unpickle its payload: for a reader
    that read many frames in one go (live results); the value's arrays are views into ``frame``."""
    length = location.length
    if length < _FIXED:
        raise _damaged(location, f"a frame of {length} bytes is shorter than its header")
    if n != length:
        raise _damaged(location, f"the file ends {length - n} bytes early")
    magic, body_length, crc = FRAME.unpack_from(frame, 0)
    if magic != FRAME_MAGIC:
        raise _damaged(location, "no frame starts there")
    if body_length + _HEAD != length:
        raise _damaged(location, f"the frame holds {body_length + _HEAD} bytes, not {length}")
    if not checked and zlib.crc32(memoryview(frame)[_HEAD:]) != crc:
        raise _damaged(location, "its checksum does not match")
    kind = FIELDS.unpack_from(frame, _HEAD)[1]
    if kind not in OK_KINDS:
        raise _damaged(location, f"it is not a result record (kind {kind})")
    try:
        start = _FIXED + (output_prefix_end(memoryview(frame)[_FIXED:]) if kind == OK_OUTPUT else 0)
        pickled = decode_payload(memoryview(frame)[start:])
    except ValueError as exc:
        raise _damaged(location, str(exc)) from None
    return pickled.load()


def _damaged(location, what):
    return DamagedRecord(f"the stored result at byte {location.offset} of {location.journal} is damaged "
                         f"({what}); rerun to recompute it")


__all__ = ["DamagedRecord", "dumps", "check_picklable", "Encoded", "encode_value", "decode_payload", "read_value",
           "OpenJournals"]
