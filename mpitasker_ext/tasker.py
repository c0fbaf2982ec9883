"""The seed-compatible ``Tasker`` and a plain ``mpimap()``: pick the communicator, build the sweep, run it."""

import io
import itertools
import logging
import os
import sys
import warnings

from .errors import MPITaskerError, UsageError
from .follow import StatusMonitor
from .results import Results
from .scheduler import run_mpi, run_serial
from .sweep import Sweep
from .views import TextProgress

log = logging.getLogger(__name__)

_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def _launcher_size():
    """How many processes mpiexec says it started (1 when not started by mpiexec)."""
    for name in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def world_communicator(method="MPI"):
    """COMM_WORLD, or None to run serially; refuses the silent disasters of a half-working MPI."""
    if method != "MPI":
        return None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:      # RuntimeError: mpi4py's wheel found no MPI library to load
        if _launcher_size() > 1:
            raise MPITaskerError(
                f"this process was started by mpiexec as one of {_launcher_size()} processes, but mpi4py cannot "
                f"be imported ({exc}); every process would run every job. Install it "
                "(pip install 'mpitasker_ext[mpich]', or your site's mpi4py) or run without mpiexec.") from exc
        log.info("mpi4py is not available (%s); running jobs serially in this process", exc)
        return None
    comm = MPI.COMM_WORLD
    if comm.size > 1:
        line_atomic_stdout()
    if comm.size == 1 and _launcher_size() > 1:
        raise MPITaskerError(
            f"mpiexec started {_launcher_size()} processes but each sees an MPI world of size 1: this mpiexec "
            "belongs to another MPI library than the one mpi4py was built for. Use the mpiexec next to this "
            "Python (e.g. the 'mpich' wheel's, in the environment's bin/), or rebuild mpi4py for your MPI.")
    return comm


def line_atomic_stdout():
    """Under mpiexec, make each printed line one write, so lines of different ranks never interleave.

    ``python -u`` writes every piece of a print separately; line buffering keeps output just as prompt.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.write_through:
            try:
                stream.reconfigure(line_buffering=True, write_through=False)
            except (ValueError, OSError) as exc:
                log.debug("cannot make %s line buffered: %s", stream, exc)


MAX_JOBS = 50_000_000  # every rank holds every argument: beyond this, memory, not the scheduler, gives out


def job_list(args):
    """The arguments as a list, with the mistakes users make named before anything runs."""
    if isinstance(args, (str, bytes)):
        raise UsageError(f"args is a {type(args).__name__}; pass a list of job arguments, e.g. [{args!r}] for "
                         "one job")
    try:
        size = len(args)
    except TypeError:
        size = None
    if size is not None and size > MAX_JOBS:
        raise UsageError(f"{size:,} jobs is more than one map handles ({MAX_JOBS:,}: every rank keeps every "
                         "argument in memory). Split the sweep into several maps, or give each job a block of "
                         "items.")
    try:
        jobs = list(itertools.islice(iter(args), MAX_JOBS + 1))
    except TypeError as exc:
        raise UsageError(f"args must be an iterable of job arguments (a list, range or generator), got "
                         f"{type(args).__name__}") from exc
    if len(jobs) > MAX_JOBS:
        raise UsageError(f"the iterable yields more than {MAX_JOBS:,} jobs, more than one map handles: split the "
                         "sweep into several maps, or give each job a block of items")
    if not jobs:
        raise UsageError("args is empty: there are no jobs to run. Check the iterable you passed (an exhausted "
                         "generator reads as empty).")
    return jobs


def enable_verbose_logging(rank):
    """Per-job lines on stderr, tagged with the rank, unless the user configured logging already."""
    logger = logging.getLogger("mpitasker_ext")
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s mpitasker[rank {rank}] %(levelname)s %(message)s"))
        logger.addHandler(handler)


def _monitor(progress, rank):
    """Rank 0 shows progress on stderr: an updating line on a terminal, a line every 30 s in a log."""
    if not progress or rank != 0:
        return None
    return StatusMonitor(TextProgress())


def run_sweep(sweep, comm, kind, in_memory=False):
    """Run the sweep, then hand back its results from the store: lazily (a sequence that reads a result when it
    is accessed), or as a list when ``in_memory``."""
    if comm is None or comm.size == 1:
        run_serial(sweep)
    else:
        run_mpi(sweep, comm)
    results = Results(os.path.abspath(sweep.output), sweep.args, kind=kind)
    return results.to_list() if in_memory else results


_COMMON_PARAMETERS = """
    retries : int
        Run a failing job up to this many more times in the same run (default 0).
    force : bool
        Discard every stored result and the output, and compute everything again.
    chunksize : int or None
        Jobs per message; None (default) adapts the batch to the measured job time.
    on_code_change : {'warn', 'reuse', 'recompute', 'error'}
        What to do when the job's code differs from the code that made the stored results: reuse them and log
        a warning (default), reuse them silently, discard them, or raise ``CodeChanged``.
    timeout : float or None
        Seconds a job may run; a job that runs longer is stopped and recorded as failed (main thread only).
    prune : bool
        After success, drop stored results whose argument is not in this grid (by default every result
        computed for this output is kept, so a grid narrowed and widened again recomputes nothing).
    in_memory : bool
        Return a list holding every result instead of the lazy sequence that reads each result from disk when
        it is accessed."""


class Tasker:
    """Drop-in for the blog post's Tasker: same ``map`` call, same output file, but errors are never swallowed
    and every rank gets the results.

    ``map(filename, fn, args)`` runs ``fn(arg)`` for each arg on ranks 1..N-1 (rank 0 schedules), keeps each
    finished result in ``filename + '.cache/'`` (the run's journals live in ``filename + '.mpi/'`` while it
    runs) and returns ``(index, [arg], result)`` triples on every rank.

    Parameters
    ----------
    method : str
        ``'MPI'`` (default) to use ``MPI.COMM_WORLD`` when mpi4py is there; anything else runs serially.
    comm : mpi4py communicator, optional
        Run on this communicator instead of ``COMM_WORLD``.
    verbose : bool
        A log line per job on stderr, tagged with the rank.
    progress : bool
        A progress line on rank 0's stderr (default True).
""" + _COMMON_PARAMETERS + """
    """

    def __init__(self, method="MPI", *, comm=None, verbose=False, retries=0, on_code_change="warn",
                 chunksize=None, progress=True, timeout=None, prune=False, in_memory=False):
        self.comm = comm if comm is not None else world_communicator(method)
        if self.comm is None:
            self.rank, self.size = 0, 1
        else:
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.root = 0
        self.verbose = verbose
        self.retries = retries
        self.on_code_change = on_code_change
        self.chunksize = chunksize
        self.progress = progress
        self.timeout = timeout
        self.prune = prune
        self.in_memory = in_memory
        if verbose:
            enable_verbose_logging(self.rank)

    def __repr__(self):
        return f"<Tasker rank {self.rank} of {self.size}>"

    def isroot(self):
        return self.rank == self.root

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False

    def map(self, filename, fn, args, *, force=False, retries=None, chunksize=None, on_code_change=None,
            timeout=None, prune=None, in_memory=None):
        """Run every job whose result is not stored yet; return ``(index, [arg], result)`` triples on every rank.

        Parameters
        ----------
        filename : str or path
            The output file: the blog post's format, ``([(index, [arg], result), ...],)``.
        fn : callable
            The job, called as ``fn(arg)``.
        args : iterable
            One job per item; every rank must build the same items.
        Other parameters override the Tasker's.

        Returns
        -------
        Results
            A read-only sequence of triples that reads each result from disk when it is accessed (a list with
            ``in_memory=True``).
        """
        jobs = job_list(args)
        sweep = Sweep(fn, jobs, os.fspath(filename),
                      retries=self.retries if retries is None else retries, force=force,
                      on_code_change=on_code_change or self.on_code_change,
                      chunksize=self.chunksize if chunksize is None else chunksize, verbose=self.verbose,
                      timeout=self.timeout if timeout is None else timeout,
                      prune=self.prune if prune is None else prune,
                      monitor=_monitor(self.progress, self.rank))
        return run_sweep(sweep, self.comm, "triples", self.in_memory if in_memory is None else in_memory)


def mpimap(fn, iterable, output=None, *, comm=None, retries=0, force=False, chunksize=None, verbose=False,
           on_code_change="warn", progress=True, timeout=None, prune=False, in_memory=False, cache=None):
    """``[fn(x) for x in iterable]`` over MPI ranks, each result stored under ``output`` as it finishes.

    Run the same script on every rank (``mpiexec -n 4 python script.py``); every rank gets the results. A rerun
    computes only the arguments without a stored result, wherever they appear in the iterable.

    Parameters
    ----------
    fn : callable
        The job, called as ``fn(x)``.
    iterable : iterable
        One job per item; every rank must build the same items.
    output : str or path
        The output file (the blog post's format); results are kept in ``output + '.cache/'``.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD`` (serial in this process without mpi4py or with one rank).
    verbose : bool
        A log line per job on stderr, tagged with the rank.
    progress : bool
        A progress line on rank 0's stderr (default True).
""" + _COMMON_PARAMETERS + """

    cache : str or path
        The former name of ``output`` (deprecated: it still works, with a ``DeprecationWarning``).

    Returns
    -------
    Results
        The results in the order of ``iterable``, read from disk when accessed (a list with ``in_memory=True``).
    """
    if cache is not None:
        if output is not None:
            raise UsageError("mpimap got both output= and cache= (its former name); give output= only")
        warnings.warn("mpimap(..., cache=PATH) is now mpimap(..., output=PATH); cache= will be removed",
                      DeprecationWarning, stacklevel=2)
        output = cache
    if output is None:
        raise UsageError("mpimap needs output='results.pkl': the output file that keeps finished jobs across "
                         "crashes and reruns")
    if comm is None:
        comm = world_communicator()
    if verbose:
        enable_verbose_logging(0 if comm is None else comm.Get_rank())
    sweep = Sweep(fn, job_list(iterable), os.fspath(output), retries=retries, force=force, chunksize=chunksize,
                  verbose=verbose, on_code_change=on_code_change, timeout=timeout, prune=prune,
                  monitor=_monitor(progress, 0 if comm is None else comm.Get_rank()))
    return run_sweep(sweep, comm, "values", in_memory)
