"""The result store ``<output>.cache/``: the finished results of one output path, kept across runs.

Journals of finished runs move in whole (their frames are never rewritten, except by ``compact``), so a grid
narrowed and widened again recomputes nothing until the user discards the store. ``index.bin`` and ``args.pkl``
describe the last finished grid, so any process reads its results lazily (``results``). Results are found by
argument digest (``scan``), never by position. See docs/design.md for the byte layout of the index.
"""

import errno
import hashlib
import json
import logging
import os
import pickle
import secrets
import shutil
import struct
import time

from .errors import CacheError, UsageError
from .files import atomic_write_bytes, fsync_dir, pread_into, read_json, unlink_quietly
from .journal import (
    FORMAT_VERSION,
    JOURNAL_PREFIX,
    JOURNAL_SUFFIX,
    SET_ASIDE_MAGIC,
    header_line,
    journal_code,
    journals_in,
)
from .payload import DamagedRecord, dumps
from .scan import Location

log = logging.getLogger(__name__)

STORE_SUFFIX = ".cache"
STORE_META = "store.json"
INDEX = "index.bin"
ARGS = "args.pkl"
COPY_CHUNK = 4 << 20  # copies read this much at a time

_INDEX_HEAD = struct.Struct("<8sIIQ16s")  # magic, format, journals, jobs, blake2b of args.pkl
_INDEX_MAGIC = b"MTINDEX\x00"
_INDEX_NAME = struct.Struct("<I")  # before each journal name (UTF-8, surrogate-escaped)
_INDEX_ENTRY = struct.Struct("<IQQ")  # per job: journal number, frame offset, frame length


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
        return journals_in(self.path)

    def read_meta(self):
        return read_json(self._file(STORE_META))

    def write_meta(self, code, function_name=""):
        meta = {"format": FORMAT_VERSION, "code": code, "function": function_name, "updated": time.time()}
        atomic_write_bytes(self._file(STORE_META), json.dumps(meta).encode())

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
                fsync_dir(directory)
        return moved

    # -- the index of the last finished grid -------------------------------------------------------------------
    def write_index(self, locations, args):
        """``args.pkl`` (the argument list) then ``index.bin`` (where each job's result is), each atomically;
        the index carries the hash of ``args.pkl``, so a crash between the two is detected, not misread."""
        data = dumps(list(args))
        atomic_write_bytes(self._file(ARGS), data)
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
        head = _INDEX_HEAD.pack(_INDEX_MAGIC, FORMAT_VERSION, len(names), len(locations), args_hash)
        atomic_write_bytes(self._file(INDEX), b"".join([head, *table, entries]))

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
        if magic != _INDEX_MAGIC or version != FORMAT_VERSION:
            raise damaged(f"not a format-{FORMAT_VERSION} index")
        pos, paths = _INDEX_HEAD.size, []
        for _ in range(njournals):
            if pos + _INDEX_NAME.size > len(data):
                raise damaged("the journal table is cut short")
            (length,) = _INDEX_NAME.unpack_from(data, pos)
            pos += _INDEX_NAME.size
            if pos + length > len(data):
                raise damaged("the journal table is cut short")
            name = os.fsdecode(data[pos:pos + length])
            if not name or name in (".", "..") or "/" in name or os.sep in name or "\x00" in name:
                raise damaged(f"a journal named {name[:80]!r} is not a file of the store")   # no path leads out
            paths.append(os.path.join(self.path, name))
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
                codes = {journal_code(journal) for (journal, _, _), _ in chosen}
                out.write(header_line(code=codes.pop() if len(codes) == 1 else None))
                pos = out.tell()
                for (journal, offset, length), digest in chosen:
                    moved[(journal, offset)] = new[digest] = Location(final, pos, length)
                    pos += length
                _copy_frames(out, [loc for loc, _ in chosen])
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, final)
        except BaseException:
            unlink_quietly(tmp)
            raise
        fsync_dir(self.path)
        self._remap_index(moved)
        for path in old:
            if path != final:
                unlink_quietly(path)
        fsync_dir(self.path)
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
            unlink_quietly(self._file(INDEX))
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
    return f"{JOURNAL_PREFIX}{tag}-{secrets.token_hex(6)}{JOURNAL_SUFFIX}"


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
            scratch = bytearray(min(COPY_CHUNK, length))
            while length:
                n = pread_into(src, memoryview(scratch)[:min(COPY_CHUNK, length)], offset)
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
            shutil.copyfileobj(fin, fout, COPY_CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        os.rename(tmp, dest)
    except BaseException:
        unlink_quietly(tmp)
        raise


def set_aside(location):
    """A stored result that no longer loads: its frame magic is overwritten, so every later scan skips it (as
    damage) and its job is computed again, instead of failing at the end of every run."""
    try:
        fd = os.open(location.journal, os.O_WRONLY)
        try:
            os.pwrite(fd, SET_ASIDE_MAGIC, location.offset)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not set aside the record at %s:%d (%s); delete %s to recompute it", location.journal,
                    location.offset, exc, location.journal)


__all__ = ["ResultStore", "IndexReader", "store_dir_for", "set_aside", "STORE_SUFFIX", "INDEX", "ARGS"]
