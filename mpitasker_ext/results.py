"""A finished run's results as the user holds them: the lazy ``Results``, ``load()``, and the streamed output file.

``Results`` reads one result at a time from the store when it is accessed, so no rank holds every result; the
output file (the blog post's format) is pickled one result at a time from the store. Never imports mpi4py.
"""

import collections
import collections.abc
import logging
import os
import pickle
import secrets

from .errors import CacheError, UsageError
from .files import unlink_quietly
from .payload import PROTOCOL, DamagedRecord, dumps, read_value
from .rundir import RunDir
from .scan import read_output
from .store import INDEX, ResultStore, store_dir_for

log = logging.getLogger(__name__)

OPEN_JOURNALS = 8  # journal files a Results keeps open
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
    def output_path(self):
        """The output file these results belong to."""
        return self._store.output

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        return self._item(self._position(i))

    def _position(self, i):
        try:
            i = i.__index__()
        except AttributeError:
            raise TypeError(f"Results indices must be integers or slices, not {type(i).__name__}") from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("Results index out of range")
        return i

    def output(self, i):
        """What job ``i`` printed ('' when nothing), read from its record: the result is not unpickled."""
        location = self._index[self._position(i)]
        try:
            return read_output(location)
        except FileNotFoundError:
            raise DamagedRecord(f"the journal {location.journal} holding job {i}'s record is gone (another run "
                                "pruned or discarded it); rerun to recompute it") from None
        except ValueError as exc:
            raise DamagedRecord(f"the record of job {i} in {location.journal} cannot be read ({exc}); rerun to "
                                "recompute it") from None

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
    if index_describes(output):
        return Results(output, kind=kind)
    with open(output, "rb") as f:
        data = pickle.load(f)
    triples = data if len(data) > 1 else data[0]
    return triples if kind == "triples" else [value for _index, _arg, value in triples]


def index_describes(output):
    """The store's index is for this output: the output is gone, or ``.code.json`` names its size and mtime."""
    if not os.path.exists(os.path.join(store_dir_for(output), INDEX)):
        return False
    try:
        st = os.stat(output)
    except FileNotFoundError:
        return True
    identity = (RunDir(output).read_meta() or {}).get("output_identity")
    return identity == [st.st_size, st.st_mtime_ns]


# -- the output file, streamed -----------------------------------------------------------------------------------------

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
            data = dumps(([triple_at(i) for i in range(n)],))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            del data
        os.replace(tmp, output)
    except BaseException:
        unlink_quietly(tmp)
        raise


__all__ = ["Results", "load", "index_describes", "write_output", "KINDS"]
