"""The end of a run on rank 0: find every job's result in the store, stream the output, keep the results.

A stored result that no longer loads is set aside and its job computed again here (a few) or by the next run (many),
so a run never ends with an output missing a result. No MPI here (the same end serves the serial path).
"""

import array
import collections.abc
import logging
import os

from .capture import JobOutput
from .execution import execute_job, failure_place, failure_report, output_lines, short_repr
from .identity import args_digest
from .payload import OpenJournals, decode_payload
from .results import write_output
from .reuse import disk_error, grid_identity
from .scan import Location, scan_journals
from .status import ERROR, FAILED, FINISHED
from .store import set_aside
from .sweep import Outcome

log = logging.getLogger(__name__)


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
                return Location(self.moved.get(path, path), offset[index], length[index])
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


class _Unloadable(Exception):
    """A stored result that does not load and whose job, computed again, failed too."""

    def __init__(self, index, failure):
        super().__init__(failure["error"])
        self.index, self.failure = index, failure


def finish(sweep, prepared, ledger):
    """Rank 0 after all work: find every job's result in the store, stream the output, keep the results."""
    run, args, digests = prepared.run, sweep.args, prepared.digests
    n = len(args)
    before = prepared.scan
    new = scan_journals([p for p in run.journal_paths() if p not in prepared.scanned], grid=digests)
    locations = GridLocations(digests, [new, before], prepared.repeats)
    missing = locations.freeze()
    if missing:
        ledger.maybe_write(FAILED, force=True)
        failures = {**before.failed, **new.failed}
        failed = {i: failures[digests[i]].failure() for i in missing if digests[i] in failures}
        if failed:
            return _failure_outcome(run, failed, n, sweep.spelling)
        if _written_for_other_arguments(run, set(missing), digests):
            return Outcome(error_type="UsageError", message=(
                f"the arguments of {len(missing)} jobs (e.g. job {missing[0]}) differ between ranks: every "
                "rank must build the same list of arguments (seed random generators; do not depend on the "
                "rank or the time). Finished records are kept in " + run.run_dir))
        return Outcome(error_type="WorkerError", message=(
            f"{len(missing)} jobs (e.g. {missing[:10]}) have no record although they were scheduled; a "
            f"worker may have lost its journal. Rerun to compute them; finished work is kept in {run.run_dir}"))
    grid = grid_identity(prepared.fingerprint, digests)
    try:
        if not prepared.unchanged:
            _write_output(sweep, prepared, locations)
        _keep_results(sweep, prepared, locations, grid, ledger.status(FINISHED).to_json())
    except _Unloadable as bad:
        ledger.maybe_write(FAILED, force=True)
        return _failure_outcome(run, {bad.index: bad.failure}, n, sweep.spelling)
    except OSError as exc:
        ledger.maybe_write(ERROR, force=True)
        return Outcome.from_exception(disk_error(run, "write the output of", exc))
    try:
        run.remove()                           # under the lock (the caller releases it): nobody may start in a
    except OSError as exc:                     # directory being deleted
        log.warning("the output %s is complete, but cleaning up %s failed (%s); delete it by hand",
                    run.output, run.run_dir, exc)
    ledger.notify_final(FINISHED)
    return Outcome(ok=True, total=n)


def _write_output(sweep, prepared, locations):
    """The blog post's output file, streamed from the store one result at a time.

    A stored result that no longer loads (its class was renamed, say) is set aside and its job computed again
    here on rank 0, so the run still ends with every result; ``locations`` is updated to the new record."""
    run, args, digests = prepared.run, sweep.args, prepared.digests
    again, journal, journals = {}, [], OpenJournals()

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
            set_aside(locations[index])
            value = again[digest] = _compute_again(sweep, prepared, index, journal)
        return (index, [args[index]], value)

    try:
        write_output(run.output, len(args), triple_at, size_at=lambda index: locations[index].length)
    except _ManyUnloadable:
        raise _Unloadable(*_set_aside_the_rest(locations, journals, args)) from None
    finally:
        journals.close()
        if journal:
            journal[0].close()
    if again:
        locations.scans.insert(0, scan_journals([journal[0].path]))
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
            set_aside(locations[index])
            bad.append(index)
    error = (f"{len(bad)} stored results (jobs {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}) "
             "no longer load (a renamed class or a changed library?); they were set aside: run again to compute "
             "them on all ranks")
    return bad[0], {"index": bad[0], "arg": short_repr(args[bad[0]]), "error": error, "traceback": ""}


def _compute_again(sweep, prepared, index, journal):
    with JobOutput(echo=sweep.echo_output) as captured:
        encoded, failure, seconds = execute_job(sweep.fn, index, sweep.args[index], sweep.timeout)
        output = captured.take()
    if failure is not None:
        raise _Unloadable(index, {**failure, "output": output} if output else failure)
    if not journal:
        journal.append(prepared.run.new_journal(0, code=prepared.fingerprint))
    journal[0].append_value(index, args_digest(sweep.args[index]), seconds, encoded, output)
    return decode_payload(encoded.to_bytes()).load()


def _keep_results(sweep, prepared, locations, grid, final_status):
    """Move this run's journals into the store and index the grid, so every rank (and ``load``) reads the
    results from there; the output's .code.json says which grid and which file it describes."""
    run, store = prepared.run, prepared.store
    moved = store.adopt(run.journal_paths())
    locations.moved = moved
    if sweep.prune:
        store.compact(set(prepared.digests), scan_journals(store.journal_paths()))
        locations = GridLocations(prepared.digests, [scan_journals(store.journal_paths())])
        locations.freeze()
    if not prepared.unchanged or moved or sweep.prune:
        store.write_index(locations, sweep.args)
    store.write_meta(prepared.fingerprint, sweep.function_name)
    st = os.stat(run.output)
    run.write_meta(len(sweep.args), prepared.fingerprint, sweep.function_name,
                     final_status=final_status, grid=grid, output_identity=[st.st_size, st.st_mtime_ns])


def _written_for_other_arguments(run, missing, digests):
    """A record of this run for a missing job under another digest: a rank built other arguments."""
    return any(record.index in missing and record.digest != digests[record.index]
               for record in run.read_records())


def _failure_outcome(run, failed, n, spelling):
    indices = sorted(failed)
    first = failed[indices[0]]
    shown = ", ".join(map(str, indices[:50])) + (" ..." if len(indices) > 50 else "")
    message = (f"{len(indices)} of {n} jobs failed: indices {shown}\n"
               f"First failure, job {indices[0]} with argument {first['arg']}{failure_place(first, ' (%s)')}: "
               f"{first['error']}\n"
               f"{first['traceback']}"
               f"{output_lines(first)}"
               f"The {n - len(indices)} finished jobs are cached in {run.run_dir}; fix the cause and rerun to "
               f"compute only the failed jobs (or pass {spelling.retries} to try them again in the same run).")
    failures = {i: failure_report(failed[i]) for i in indices[:1000]}
    return Outcome(error_type="JobsFailed", message=message, failures=failures, total=n)
