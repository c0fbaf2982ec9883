"""Reading back what a job printed: ``job_output(output, index)``, from the job's record, never unpickling.

A finished run's jobs are found through the store's index (where each job of the last finished grid has its
record); a run still going, failed or interrupted, through the journals of its run directory, and only those of
the current run: a journal older than the run's manifest may have been written for another grid, where job N
was another argument. The output is the prefix of an ok record (kind 3) or a field of a failed record's JSON,
so reading it never reads the pickle after it: a planted journal cannot run code here.
"""

import operator
import os

from .errors import CacheError, UsageError
from .results import Results, index_describes
from .rundir import RUN_SUFFIX, RunDir
from .scan import job_records, read_output
from .status import int_field, number_field, text_field

JOURNAL_SLACK = 5.0  # seconds a journal's `started` may precede its run's manifest (clocks of other hosts)


def job_output(output, index):
    """What job ``index`` of the run of ``output`` printed to stdout and stderr ('' when it printed nothing):
    the last 64 KiB, a cut marked at the start. Raises ``UsageError`` when the job has no record (the run has
    not reached it, or there are fewer jobs)."""
    try:
        index = operator.index(index)
    except TypeError:
        raise UsageError(f"the job number must be a whole number, not {type(index).__name__}") from None
    if index < 0:
        raise UsageError(f"job {index}: job numbers start at 0")
    path = os.path.abspath(os.fspath(output))
    if path.endswith(RUN_SUFFIX):
        path = path[:-len(RUN_SUFFIX)]
    run = RunDir(path)
    if run.exists():
        text = _from_run(run, index)
        if text is not None:
            return text
        if run.exists():
            raise UsageError(f"job {index} of {path} has not finished in the current run yet (or its result was "
                             "kept from an earlier run, whose output can be read once this run finishes): wait "
                             "for it, or rerun the map if the run stopped")
    return _from_store(path, index)


def _from_run(run, index):
    """The job's output from the current run's journals; None when none of them holds a record of it. An ok
    record wins over failed ones (a retry that succeeded), else the last one written."""
    manifest = run.read_manifest() or {}
    njobs = int_field(manifest, "njobs", None)
    if njobs is not None and index >= njobs:
        raise UsageError(f"job {index} is out of range: the run of {run.output} has {njobs} jobs "
                         f"(0 to {njobs - 1})")
    created = number_field(manifest, "created", None)
    if created is None:
        return None                              # no manifest yet: the run is only starting
    host = text_field(manifest, "host")
    best = None
    for path in run.journal_paths():
        header, records = job_records(path, index)
        started = number_field(header, "started", None)
        same_clock = host and text_field(header, "host") == host   # opened after the manifest, by the same clock
        if started is None or started < created - (0.0 if same_clock else JOURNAL_SLACK):
            continue
        for record, location in records:
            key = (record.ok, started)
            if best is None or key >= best[0]:
                best = (key, record, location)
    if best is None:
        return None
    _key, record, location = best
    if not record.ok:
        return record.failure().get("output", "")
    try:
        return read_output(location)
    except FileNotFoundError:
        return None                              # the run finished meanwhile: its journals moved into the store
    except (OSError, ValueError) as exc:
        raise CacheError(f"the record of job {index} in {location.journal} cannot be read ({exc}); rerun the "
                         "map to compute it again") from None


def _from_store(path, index):
    """A finished run's job, through the store's index of its last grid."""
    if not index_describes(path):
        if os.path.exists(path):
            raise UsageError(f"{path} has no job records this version can read (an output of an older version, "
                             "or one another tool rewrote): rerun the map to keep each job's output")
        raise UsageError(f"no run of {path} yet: run the map first; each job's output is kept with its record")
    results = Results(path, kind="values")
    if index >= len(results):
        raise UsageError(f"job {index} is out of range: the run of {path} has {len(results)} jobs "
                         f"(0 to {len(results) - 1})")
    try:
        return results.output(index)
    finally:
        results.close()


__all__ = ["job_output"]
