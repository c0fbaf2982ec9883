"""Which jobs are already done: the reuse rules, over the run directory and the result store.

A job is what it computes: its identity is (code fingerprint, argument digest), never its position. Rank 0 finds
every finished result whose argument appears anywhere in the grid and computes each missing argument once; the
end of the run is ``finish``'s. No MPI here (the same rules serve the serial path), and no stored result is
unpickled here: scans read headers and checksums only (a plain output being adopted is the one pickle read).
"""

import collections.abc
import hashlib
import logging
import os
from dataclasses import dataclass

from .errors import CacheError, CodeChanged
from .execution import short_repr
from .identity import args_digest, args_digests, code_fingerprint
from .journal import journal_code
from .payload import check_picklable, encode_value
from .rundir import MANIFEST, RunDir
from .scan import scan_journals
from .store import ResultStore

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Rank 0's plan for a run: the identities of its jobs and the ones still to compute."""

    run: RunDir
    store: ResultStore
    fingerprint: str
    digests: list
    pending: list  # job indices to compute: one per distinct argument without a stored result
    cached: int = 0  # jobs already done: a stored result, or an argument repeated from a job computed now
    unchanged: bool = False  # the output and the store's index already hold exactly this grid
    scan: object = None  # what the journals held at the start (they do not change under the lock)
    scanned: frozenset = frozenset()  # the journals that scan read
    repeats: dict = None  # job -> the earlier job with the same argument, computed for both


class PackedDigests(collections.abc.Sequence):
    """A grid's argument digests in one bytes object: 16 bytes a job instead of ~57 in a list of bytes."""

    def __init__(self, digests):
        self._data = b"".join(digests)

    def __len__(self):
        return len(self._data) // 16

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._data[16 * index:16 * index + 16]

    def __iter__(self):
        data = self._data
        return (data[i:i + 16] for i in range(0, len(data), 16))


def disk_error(run, what, exc):
    """An I/O failure as users need to read it: what failed, why, and that finished work is safe."""
    return CacheError(
        f"cannot {what} {run.output}: {exc.strerror or exc} ({getattr(exc, 'filename', '') or run.run_dir}). "
        f"Every finished job is kept in {run.run_dir}; fix the cause (free disk space, permissions) and rerun: "
        "finished jobs are not computed again.")


def grid_identity(fingerprint, digests):
    """One digest of a whole grid (code and every argument, in order): a rerun of the very same map is told
    apart from any other without reading a result."""
    h = hashlib.blake2b(fingerprint.encode(), digest_size=16)
    for digest in digests:
        h.update(digest)
    return h.hexdigest()


def prepare(sweep):
    """Rank 0 before any work, under the run's lock (released here on failure, by the caller otherwise)."""
    run = RunDir(sweep.output)
    store = ResultStore(run.output)
    run.check_output_path()
    check_picklable(sweep.args)
    fingerprint = sweep.fingerprint or code_fingerprint(sweep.fn)
    digests = PackedDigests(args_digests(sweep.args))
    run.create()
    run.acquire_lock()
    try:
        _apply_reuse_rules(sweep, run, store, fingerprint, digests)
        scanned = store.journal_paths() + run.journal_paths()
        scan = scan_journals(scanned)
        pending, cached, first, repeats = [], 0, {}, {}
        for index, digest in enumerate(digests):
            if digest in scan.ok:
                cached += 1
            elif digest in first:
                cached += 1
                repeats[index] = first[digest]
            else:
                first[digest] = index
                pending.append(index)
        del first
        prepared = Prepared(run, store, fingerprint, digests, pending, cached, scan=scan,
                            scanned=frozenset(scanned), repeats=repeats)
        _report_interrupted([info for info in scan.interrupted if info.in_flight is not None
                             and info.in_flight < len(digests) and digests[info.in_flight] not in scan.ok],
                            sweep.args)
        prepared.unchanged = not pending and _output_holds(run, store, grid_identity(fingerprint, digests))
    except BaseException:
        run.release_lock()
        _remove_if_unused(run)
        raise
    return prepared


def _remove_if_unused(run):
    """A run stopped before it started (a code-change question, bad input): leave no empty run directory."""
    if not _run_started(run):
        try:
            run.remove()
        except OSError as exc:
            log.debug("could not remove the unused %s: %s", run.run_dir, exc)


def _apply_reuse_rules(sweep, run, store, fingerprint, digests):
    """Decide what earlier results may serve this run (see docs/design.md, "Reuse rules").

    Every journal names the code fingerprint its results were computed with, so the code-change policy is
    applied to exactly the results made by other code, wherever they are (an interrupted run, the store)."""
    if sweep.force:
        _discard_everything(run, store)
    else:
        journals = store.journal_paths() + run.journal_paths()
        other = [path for path in journals if journal_code(path) != fingerprint]
        if other:
            before = (run.read_manifest() or store.read_meta() or {}).get("function")
            what = (f"the job function's code changed since {len(other)} of the {len(journals)} journals of "
                    f"stored results of {run.output} were written (function {before!r} then, "
                    f"{sweep.function_name!r} now)")
            if not _code_change(sweep, what):
                for path in other:
                    os.unlink(path)
    adopt = not sweep.force and not _has_results(run, store) and os.path.exists(run.output)
    if adopt:
        meta = run.read_meta()                     # asked before anything is written
        adopt = meta is None or meta.get("code") == fingerprint or _code_change(
            sweep, f"the code that made {run.output} differs from the code now")
    _write_manifest(sweep, run, fingerprint)
    if adopt:
        _adopt_plain_output(sweep, run, fingerprint, digests)


def _write_manifest(sweep, run, fingerprint):
    try:
        run.write_manifest(len(sweep.args), fingerprint, sweep.function_name)
    except OSError as exc:
        raise disk_error(run, "write the manifest of", exc) from exc


def _has_results(run, store):
    return bool(run.journal_paths() or store.journal_paths())


def _run_started(run):
    """A run began here and did not finish: it wrote its manifest or journals."""
    return os.path.exists(run.path(MANIFEST)) or bool(run.journal_paths())


def _discard_everything(run, store):
    """``force``: the old output, the journals and the store go before any new work, so nothing of them can
    come back. The output goes first: a force stopped half way must not leave an output without its store,
    which the next run would adopt."""
    if _has_results(run, store) or os.path.exists(run.output):
        log.warning("force: discarding the stored results of %s", run.output)
    for path in (run.output, run.meta_path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise disk_error(run, "remove the old output of", exc) from exc
    run.discard_records()
    store.discard()


def _adopt_plain_output(sweep, run, fingerprint, digests):
    """An output without a store (an older version's, or the blog post's): its results whose argument appears in
    the grid are copied once into a journal, so from then on the store serves them."""
    triples = run.read_output()
    if not triples:
        return
    wanted = set(digests)
    copied, journal = 0, None
    try:
        for index, arg_list, value in triples:
            digest = args_digest(arg_list[0])
            if digest not in wanted:
                continue
            wanted.discard(digest)
            try:
                encoded = encode_value(value)
            except Exception as exc:  # noqa: BLE001 - a value that no longer pickles is simply recomputed
                log.warning("result %s of %s cannot be stored again (%s); recomputing it", index, run.output, exc)
                continue
            if journal is None:
                run.create()
                journal = run.new_journal(0, code=fingerprint)
            journal.append_value(index if isinstance(index, int) and index >= 0 else 0, digest, 0.0, encoded)
            copied += 1
    finally:
        if journal is not None:
            journal.close()
    log.info("%s: reusing %d results of the existing output", run.output, copied)


def _output_holds(run, store, grid):
    """The output, its .code.json and the store's index already describe this very grid and code."""
    meta = run.read_meta() or {}
    identity = meta.get("output_identity")
    if meta.get("grid") != grid or not isinstance(identity, list) or not store.has_index():
        return False
    try:
        st = os.stat(run.output)
    except OSError:
        return False
    return identity == [st.st_size, st.st_mtime_ns]


def _code_change(sweep, what):
    """Apply the on_code_change policy; True when the stored results may be used."""
    policy = sweep.on_code_change
    if policy == "error":
        raise CodeChanged(f"{what}. Choose: recompute everything ({sweep.spelling.force}) or keep the cached "
                          f"results ({sweep.spelling.reuse}).")
    if policy == "recompute":
        log.warning("%s; recomputing, as asked (on_code_change='recompute')", what)
        return False
    if policy == "warn":
        log.warning("%s; reusing the cached results. Pass force=True (or delete them) to recompute.", what)
    return True


def _report_interrupted(interrupted, args):
    """Say which jobs were running when earlier runs died: the one that kills its process is among them."""
    if not interrupted:
        return
    shown = ", ".join(f"job {i.in_flight} (rank {i.rank}, pid {i.pid} on {i.host})" for i in interrupted[-8:])
    log.warning("an earlier run stopped while these jobs were running: %s; they run again now", shown)
    deaths = {}
    for info in interrupted:
        deaths[info.in_flight] = deaths.get(info.in_flight, 0) + 1
    for index, count in sorted(deaths.items()):
        if count >= 2 and index < len(args):
            log.warning("job %d was running each of the %d times a process of this sweep died: it probably kills "
                        "its own process (os._exit, a segfault, running out of memory). Its argument is %s; try "
                        "it alone with fn(args[%d]).", index, count, short_repr(args[index]), index)
