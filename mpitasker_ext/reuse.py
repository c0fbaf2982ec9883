"""Which jobs are already done, and the end of a run: the reuse rules over the run directory and the store.

A job is what it computes: its identity is (code fingerprint, argument digest), never its position. Rank 0 finds
every finished result whose argument appears anywhere in the grid, computes each missing argument once, and at
the end streams the output from the store. No MPI here (the same rules serve the serial path), and no result is
unpickled before the end, where the output is written one result at a time.
"""

import array
import collections.abc
import hashlib
import logging
import os
from dataclasses import dataclass

from . import cache as cachemod
from . import store as storemod
from .errors import CacheError, CodeChanged
from .execution import execute_job, short_repr
from .identity import args_digests
from .sweep import Outcome

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Rank 0's plan for a run: the identities of its jobs and the ones still to compute."""

    cache: cachemod.RunCache
    store: storemod.ResultStore
    fingerprint: str
    digests: list
    pending: list  # job indices to compute: one per distinct argument without a stored result
    cached: int = 0  # jobs already done: a stored result, or an argument repeated from a job computed now
    unchanged: bool = False  # the output and the store's index already hold exactly this grid
    scan: object = None  # what the journals held at the start (they do not change under the lock)
    scanned: frozenset = frozenset()  # the journals that scan read
    repeats: dict = None  # job -> the earlier job with the same argument, computed for both


class GridLocations(collections.abc.Sequence):
    """Where each job of the grid has its result, looked up by digest when asked (a list of a million
    ``Location``s would hold ~80 MB on rank 0); None for a job without a result. ``moved`` maps journals
    that moved into the store to their new paths."""

    def __init__(self, digests, scans, repeats=None):
        self.digests, self.scans, self.moved, self.repeats = digests, scans, {}, repeats or {}
        self._table = None

    def __len__(self):
        return len(self.digests)

    def freeze(self):
        """Look every job up once into flat arrays (20 bytes a job): the output, the index and the missing
        check then read them at array speed. Returns the jobs without a result."""
        n = len(self.digests)
        paths, numbers, missing = [], {}, []
        journal, offset, length = (array.array("I", bytes(4 * n)), array.array("Q", bytes(8 * n)),
                                   array.array("Q", bytes(8 * n)))
        self._table = None
        for index in range(n):
            location = self[index]
            if location is None:
                missing.append(index)
                continue
            number = numbers.get(location.journal)
            if number is None:
                number = numbers[location.journal] = len(paths)
                paths.append(location.journal)
            journal[index], offset[index], length[index] = number, location.offset, location.length
        self._table = (paths, journal, offset, length)
        return missing

    def __getitem__(self, index):
        if self._table is not None:
            paths, journal, offset, length = self._table
            if length[index]:
                path = paths[journal[index]]
                return storemod.Location(self.moved.get(path, path), offset[index], length[index])
            return None
        digest = self.digests[index]
        for scan in self.scans:
            location = scan.ok.get(digest)
            if location is None and scan.at_index is not None:
                location = scan.at_index.get(self.repeats.get(index, index))
            if location is not None:
                journal = self.moved.get(location.journal)
                return location if journal is None else location._replace(journal=journal)
        return None

    def __iter__(self):
        return (self[i] for i in range(len(self)))


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


def disk_error(cache, what, exc):
    """An I/O failure as users need to read it: what failed, why, and that finished work is safe."""
    return CacheError(
        f"cannot {what} {cache.output}: {exc.strerror or exc} ({getattr(exc, 'filename', '') or cache.run_dir}). "
        f"Every finished job is kept in {cache.run_dir}; fix the cause (free disk space, permissions) and rerun: "
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
    cache = cachemod.RunCache(sweep.output)
    store = storemod.ResultStore(cache.output)
    cache.check_output_path()
    cachemod.check_picklable(sweep.args)
    fingerprint = sweep.fingerprint or cachemod.code_fingerprint(sweep.fn)
    digests = PackedDigests(args_digests(sweep.args))
    cache.create()
    cache.acquire_lock()
    try:
        _apply_reuse_rules(sweep, cache, store, fingerprint, digests)
        scanned = store.journal_paths() + cache.journal_paths()
        scan = storemod.scan_journals(scanned)
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
        prepared = Prepared(cache, store, fingerprint, digests, pending, cached, scan=scan,
                            scanned=frozenset(scanned), repeats=repeats)
        _report_interrupted([info for info in scan.interrupted if info.in_flight is not None
                             and info.in_flight < len(digests) and digests[info.in_flight] not in scan.ok],
                            sweep.args)
        prepared.unchanged = not pending and _output_holds(cache, store, grid_identity(fingerprint, digests))
    except BaseException:
        cache.release_lock()
        _remove_if_unused(cache)
        raise
    return prepared


def _remove_if_unused(cache):
    """A run stopped before it started (a code-change question, bad input): leave no empty run directory."""
    if not _run_started(cache):
        try:
            cache.remove()
        except OSError as exc:
            log.debug("could not remove the unused %s: %s", cache.run_dir, exc)


def _apply_reuse_rules(sweep, cache, store, fingerprint, digests):
    """Decide what earlier results may serve this run (see docs/design.md, "Reuse rules").

    Every journal names the code fingerprint its results were computed with, so the code-change policy is
    applied to exactly the results made by other code, wherever they are (an interrupted run, the store)."""
    if sweep.force:
        _discard_everything(cache, store)
    else:
        journals = store.journal_paths() + cache.journal_paths()
        other = [path for path in journals if cachemod.journal_code(path) != fingerprint]
        if other:
            before = (cache.read_manifest() or store.read_meta() or {}).get("function")
            what = (f"the job function's code changed since {len(other)} of the {len(journals)} journals of "
                    f"stored results of {cache.output} were written (function {before!r} then, "
                    f"{sweep.function_name!r} now)")
            if not _code_change(sweep, what):
                for path in other:
                    os.unlink(path)
    adopt = not sweep.force and not _has_results(cache, store) and os.path.exists(cache.output)
    if adopt:
        meta = cache.read_meta()                     # asked before anything is written
        adopt = meta is None or meta.get("code") == fingerprint or _code_change(
            sweep, f"the code that made {cache.output} differs from the code now")
    _write_manifest(sweep, cache, fingerprint)
    if adopt:
        _adopt_plain_output(sweep, cache, fingerprint, digests)


def _write_manifest(sweep, cache, fingerprint):
    try:
        cache.write_manifest(len(sweep.args), fingerprint, sweep.function_name)
    except OSError as exc:
        raise disk_error(cache, "write the manifest of", exc) from exc


def _has_results(cache, store):
    return bool(cache.journal_paths() or store.journal_paths())


def _run_started(cache):
    """A run began here and did not finish: it wrote its manifest or journals."""
    return os.path.exists(cache.path(cachemod.MANIFEST)) or bool(cache.journal_paths())


def _discard_everything(cache, store):
    """``force``: the old output, the journals and the store go before any new work, so nothing of them can
    come back. The output goes first: a force stopped half way must not leave an output without its store,
    which the next run would adopt."""
    if _has_results(cache, store) or os.path.exists(cache.output):
        log.warning("force: discarding the stored results of %s", cache.output)
    for path in (cache.output, cache.meta_path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise disk_error(cache, "remove the old output of", exc) from exc
    cache.discard_records()
    store.discard()


def _adopt_plain_output(sweep, cache, fingerprint, digests):
    """An output without a store (an older version's, or the blog post's): its results whose argument appears in
    the grid are copied once into a journal, so from then on the store serves them."""
    triples = cache.read_output()
    if not triples:
        return
    wanted = set(digests)
    copied, journal = 0, None
    try:
        for index, arg_list, value in triples:
            digest = cachemod.args_digest(arg_list[0])
            if digest not in wanted:
                continue
            wanted.discard(digest)
            try:
                encoded = storemod.encode_value(value)
            except Exception as exc:  # noqa: BLE001 - a value that no longer pickles is simply recomputed
                log.warning("result %s of %s cannot be stored again (%s); recomputing it", index, cache.output, exc)
                continue
            if journal is None:
                cache.create()
                journal = cache.new_journal(0, code=fingerprint)
            journal.append_value(index if isinstance(index, int) and index >= 0 else 0, digest, 0.0, encoded)
            copied += 1
    finally:
        if journal is not None:
            journal.close()
    log.info("%s: reusing %d results of the existing output", cache.output, copied)


def _output_holds(cache, store, grid):
    """The output, its .code.json and the store's index already describe this very grid and code."""
    meta = cache.read_meta() or {}
    identity = meta.get("output_identity")
    if meta.get("grid") != grid or not isinstance(identity, list) or not store.has_index():
        return False
    try:
        st = os.stat(cache.output)
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


class _Unloadable(Exception):
    """A stored result that does not load and whose job, computed again, failed too."""

    def __init__(self, index, failure):
        super().__init__(failure["error"])
        self.index, self.failure = index, failure


def finish(sweep, prepared, ledger):
    """Rank 0 after all work: find every job's result in the store, stream the output, keep the results."""
    cache, args, digests = prepared.cache, sweep.args, prepared.digests
    n = len(args)
    before = prepared.scan
    new = storemod.scan_journals([p for p in cache.journal_paths() if p not in prepared.scanned], grid=digests)
    locations = GridLocations(digests, [new, before], prepared.repeats)
    missing = locations.freeze()
    if missing:
        ledger.maybe_write("failed", force=True)
        cache.release_lock()
        failures = {**before.failed, **new.failed}
        failed = {i: failures[digests[i]].failure() for i in missing if digests[i] in failures}
        if failed:
            return _failure_outcome(cache, failed, n, sweep.spelling)
        if _written_for_other_arguments(cache, set(missing), digests):
            return Outcome(error_type="UsageError", message=(
                f"the arguments of {len(missing)} jobs (e.g. job {missing[0]}) differ between ranks: every "
                "rank must build the same list of arguments (seed random generators; do not depend on the "
                "rank or the time). Finished records are kept in " + cache.run_dir))
        return Outcome(error_type="WorkerError", message=(
            f"{len(missing)} jobs (e.g. {missing[:10]}) have no record although they were scheduled; a "
            f"worker may have lost its journal. Rerun to compute them; finished work is kept in {cache.run_dir}"))
    grid = grid_identity(prepared.fingerprint, digests)
    try:
        if not prepared.unchanged:
            _write_output(sweep, prepared, locations)
        _keep_results(sweep, prepared, locations, grid, ledger.status("finished"))
    except _Unloadable as bad:
        ledger.maybe_write("failed", force=True)
        cache.release_lock()
        return _failure_outcome(cache, {bad.index: bad.failure}, n, sweep.spelling)
    except OSError as exc:
        ledger.maybe_write("error", force=True)
        cache.release_lock()
        return Outcome.from_exception(disk_error(cache, "write the output of", exc))
    try:
        cache.remove()
    except OSError as exc:
        log.warning("the output %s is complete, but cleaning up %s failed (%s); delete it by hand",
                    cache.output, cache.run_dir, exc)
    finally:
        cache.release_lock()                     # after the removal: nobody may start in a directory we delete
    ledger.notify_final("finished")
    return Outcome(ok=True, total=n)


def _write_output(sweep, prepared, locations):
    """The blog post's output file, streamed from the store one result at a time.

    A stored result that no longer loads (its class was renamed, say) is set aside and its job computed again
    here on rank 0, so the run still ends with every result; ``locations`` is updated to the new record."""
    cache, args, digests = prepared.cache, sweep.args, prepared.digests
    again, journal, journals = {}, [], storemod.OpenJournals()

    def triple_at(index):
        digest = digests[index]
        if digest in again:
            return (index, [args[index]], again[digest])
        try:
            value = journals.read_value(locations[index])
        except (MemoryError, OSError):
            raise                                   # passing trouble: the stored result itself is fine
        except Exception as exc:  # noqa: BLE001 - unpickling a stored result can raise any type
            if len(again) >= RECOMPUTE_ON_RANK_0:
                raise _ManyUnloadable() from exc
            log.warning("the cached result of job %d cannot be loaded (%s: %s); recomputing it", index,
                        type(exc).__name__, exc)
            storemod.set_aside(locations[index])
            value = again[digest] = _compute_again(sweep, prepared, index, journal)
        return (index, [args[index]], value)

    try:
        storemod.write_output(cache.output, len(args), triple_at, size_at=lambda index: locations[index].length)
    except _ManyUnloadable:
        raise _Unloadable(*_set_aside_the_rest(locations, journals, args)) from None
    finally:
        journals.close()
        if journal:
            journal[0].close()
    if again:
        locations.scans.insert(0, storemod.scan_journals([journal[0].path]))
        locations.freeze()


RECOMPUTE_ON_RANK_0 = 8  # beyond this many unloadable results, the workers should compute them (next run)


class _ManyUnloadable(Exception):
    pass


def _set_aside_the_rest(locations, journals, args):
    """Many stored results no longer load (a renamed class, a changed library): rather than computing them one
    by one on rank 0 while the workers wait, set every such result aside and let the next run compute them on
    all ranks. Returns the (index, failure) to report."""
    bad = []
    for index in range(len(locations)):
        try:
            journals.read_value(locations[index])
        except (MemoryError, OSError):
            raise
        except Exception:  # noqa: BLE001 - unpickling a stored result can raise any type
            storemod.set_aside(locations[index])
            bad.append(index)
    error = (f"{len(bad)} stored results (jobs {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}) "
             "no longer load (a renamed class or a changed library?); they were set aside: run again to compute "
             "them on all ranks")
    return bad[0], {"index": bad[0], "arg": short_repr(args[bad[0]]), "error": error, "traceback": ""}


def _compute_again(sweep, prepared, index, journal):
    encoded, failure, seconds = execute_job(sweep.fn, index, sweep.args[index], sweep.timeout)
    if failure is not None:
        raise _Unloadable(index, failure)
    if not journal:
        journal.append(prepared.cache.new_journal(0, code=prepared.fingerprint))
    journal[0].append_value(index, cachemod.args_digest(sweep.args[index]), seconds, encoded)
    return storemod.decode_payload(encoded.to_bytes()).load()


def _keep_results(sweep, prepared, locations, grid, final_status):
    """Move this run's journals into the store and index the grid, so every rank (and ``load``) reads the
    results from there; the output's .code.json says which grid and which file it describes."""
    cache, store = prepared.cache, prepared.store
    moved = store.adopt(cache.journal_paths())
    locations.moved = moved
    if sweep.prune:
        store.compact(set(prepared.digests), storemod.scan_journals(store.journal_paths()))
        locations = GridLocations(prepared.digests, [storemod.scan_journals(store.journal_paths())])
        locations.freeze()
    if not prepared.unchanged or moved or sweep.prune:
        store.write_index(locations, sweep.args)
    store.write_meta(prepared.fingerprint, sweep.function_name)
    st = os.stat(cache.output)
    cache.write_meta(len(sweep.args), prepared.fingerprint, sweep.function_name,
                     final_status=final_status, grid=grid, output_identity=[st.st_size, st.st_mtime_ns])


def _written_for_other_arguments(cache, missing, digests):
    """A record of this run for a missing job under another digest: a rank built other arguments."""
    return any(record.index in missing and record.digest != digests[record.index]
               for record in cache.read_records())


def _failure_outcome(cache, failed, n, spelling):
    indices = sorted(failed)
    first = failed[indices[0]]
    shown = ", ".join(map(str, indices[:50])) + (" ..." if len(indices) > 50 else "")
    message = (f"{len(indices)} of {n} jobs failed: indices {shown}\n"
               f"First failure, job {indices[0]} with argument {first['arg']}: {first['error']}\n"
               f"{first['traceback']}"
               f"The {n - len(indices)} finished jobs are cached in {cache.run_dir}; fix the cause and rerun to "
               f"compute only the failed jobs (or pass {spelling.retries} to try them again in the same run).")
    failures = {i: failed[i]["traceback"] or failed[i]["error"] for i in indices[:1000]}
    return Outcome(error_type="JobsFailed", message=message, failures=failures, total=n)
