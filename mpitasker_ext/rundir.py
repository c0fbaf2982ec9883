"""The run directory ``<output>.mpi/`` of one output path, and the files beside the output.

It holds one run: a manifest, per-process journals, a status file and a lock; it goes when the run finishes,
and its journals move into the result store (``store``). Beside a finished output stays ``<output>.code.json``
(JSON, never a pickle), so views can show how the run went without opening the output. See docs/design.md.
"""

import json
import logging
import os
import pickle
import secrets
import shutil
import socket
import time

from .errors import CacheError, UsageError
from .files import atomic_write_bytes, read_json
from .journal import FORMAT_VERSION, JOURNAL_PREFIX, JOURNAL_SUFFIX, STARTED, JournalWriter, journals_in
from .lock import RunLock
from .scan import journal_records, scan_journals

log = logging.getLogger(__name__)

RUN_SUFFIX = ".mpi"
MANIFEST = "manifest.json"
STATUS = "status.json"
LOCK = "lock.json"
META_SUFFIX = ".code.json"


def run_dir_for(output):
    return os.fspath(output) + RUN_SUFFIX


class RunDir:
    """The run directory of one output file, and the output file itself."""

    def __init__(self, output):
        output = os.fspath(output)
        if not output:
            raise UsageError("the output path is empty; give a file name such as 'results.pkl'")
        self.output = os.path.abspath(output)
        self.run_dir = run_dir_for(self.output)
        self.lock = RunLock(self.path(LOCK), self.output, self.path(STATUS))

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
        """The triples of an output without a store (an older version's, the blog post's), to adopt them; None
        if absent or unreadable (then it is recomputed). Only rank 0, about to run this very output, calls it."""
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
        return read_json(self.meta_path)

    # -- run directory -----------------------------------------------------------------------------------------
    def exists(self):
        return os.path.isdir(self.run_dir)

    def create(self):
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the run directory {self.run_dir}: {exc.strerror}") from exc

    def read_manifest(self):
        return read_json(self.path(MANIFEST))

    def write_manifest(self, njobs, fingerprint, function_name=""):
        manifest = {"format": FORMAT_VERSION, "njobs": njobs, "code": fingerprint, "function": function_name,
                    "output": os.path.basename(self.output), "created": time.time(), "host": socket.gethostname()}
        atomic_write_bytes(self.path(MANIFEST), json.dumps(manifest, indent=1).encode(), durable=False)

    def journal_paths(self):
        return journals_in(self.run_dir)

    def new_journal(self, rank, code=None):
        """A fresh journal for this process; a new file per run, so a torn tail is never appended to. ``code``
        (the fingerprint of the code that computes its results) goes in its header line."""
        name = f"{JOURNAL_PREFIX}r{rank:05d}-{secrets.token_hex(4)}{JOURNAL_SUFFIX}"
        try:
            return JournalWriter(self.path(name), rank, code=code)
        except OSError as exc:
            raise CacheError(f"cannot create journal {self.path(name)}: {exc.strerror}") from exc

    def read_records(self):
        """Every valid finished-job record (ok or failed) of every journal, in file order; never a payload of
        an ok record (see ``scan.journal_records``)."""
        for path in self.journal_paths():
            yield from (rec for rec in journal_records(path) if rec.kind != STARTED)

    def interrupted_jobs(self):
        """Jobs that were running when their process stopped, oldest journal first: (index, JournalInfo)."""
        return [(info.in_flight, info) for info in scan_journals(self.journal_paths()).interrupted]

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
        return read_json(self.path(STATUS))

    # -- lock --------------------------------------------------------------------------------------------------
    def read_lock(self):
        """The lock's holder (a ``lock.LockHolder``), or None when the run is not locked."""
        return self.lock.holder()

    def acquire_lock(self):
        """Exclusive use of the run directory: one run per output (see ``lock.RunLock``)."""
        self.lock.acquire()

    def release_lock(self):
        self.lock.release()

    def locked(self):
        """``with run.locked():`` holds the lock (with its heartbeat) for the block."""
        return self.lock.held()


__all__ = ["RunDir", "run_dir_for", "RUN_SUFFIX", "MANIFEST", "STATUS", "LOCK", "META_SUFFIX"]
