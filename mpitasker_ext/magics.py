"""``%%mpimap``, ``%mpicluster`` and ``%mpistatus``: a thin front end. Parsing and messages here; the cell becomes
a job in ``closure``, the cluster session lives in ``cluster``, the views in ``views`` and ``follow``.

The package's errors reach IPython as they are: their ``_render_traceback_`` shows the message without our
internal frames.
"""

import logging
import os
import sys
import time
from dataclasses import dataclass

from IPython.core import magic_arguments
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import closure
from . import cluster as clustermod
from . import progress as progressmod
from .errors import JobsFailed, UsageError
from .follow import REFRESH_SECONDS, Follower, StatusMonitor, earlier_run, follow_run, started_since
from .joboutput import job_output
from .live import LiveResults, LiveView
from .results import Results
from .rundir import RunDir
from .status import MISSING
from .sweep import Spelling
from .tasker import job_list
from .views import make_view

log = logging.getLogger(__name__)

MAGIC_SPELLING = Spelling(retries="--retries N", force="--force", reuse="--reuse")


def _cluster_options(func):
    """The options that choose a cluster, shared by both magics."""
    func = magic_arguments.argument("--cluster-id", default=None,
                                    help="the cluster's id (as given to ipcluster --cluster-id)")(func)
    return magic_arguments.argument("--profile", default=None,
                                    help="the IPython profile of the cluster (default: the one this kernel "
                                         "started, else 'default')")(func)


class MapRun:
    """Handle of a ``--no-wait`` run: ``done()``, ``wait()``, ``result()``, ``partial()`` (what is finished so
    far), ``output(i)`` (what job i printed); the variable is set when it ends. ``output_path`` is the run's output
    file."""

    def __init__(self, future, finish, output, follower=None, args=None, since=None, earlier=None):
        self._future = future
        self._finish = finish
        self.output_path = output
        self._follower = follower
        self._args = args
        self._since = since
        self._earlier = earlier
        self._live = None
        self._values = None
        self._error = None
        future.add_done_callback(self._settle)

    def _settle(self, future):
        try:
            self._values = self._finish(future)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised by result()
            self._error = exc
            log.error("%%mpimap run for %s failed: %s", self.output_path, exc)
        finally:
            if self._follower is not None:
                self._follower.stop()

    def status(self):
        """The run's progress model right now."""
        return progressmod.read_progress(self.output_path)

    def output(self, index):
        """What job ``index`` printed ('' when nothing), as soon as the job has finished."""
        return job_output(self.output_path, index)

    def done(self):
        return self._future.done()

    def wait(self, timeout=None):
        self._future.exception(timeout)  # waits; errors surface in result()
        while self._values is None and self._error is None:
            time.sleep(0.01)  # the done callback may still be running in another thread
        return self.done()

    def result(self, timeout=None):
        self.wait(timeout)
        if self._error is not None:
            raise self._error
        return self._values

    def partial(self):
        """``{job index: result}`` of the jobs finished so far, in job order; each call reads only what was
        added since the last one. Empty until the run has started, and when it never started (a code-change
        question): an earlier run's results are not shown."""
        if self._values is not None:
            return dict(enumerate(self._values))
        snapshot = progressmod.read_progress(self.output_path)
        if not started_since(snapshot, self._since, self._earlier):
            return {}
        if self._live is None:
            self._live = LiveResults(self.output_path, self._args)
        self._live.refresh()
        indices, _args, values = self._live.finished()
        return dict(zip(indices, values, strict=True))

    def __repr__(self):
        state = "running" if not self.done() else ("failed" if self._error else "finished")
        return f"<%%mpimap run of {self.output_path}: {state}>"


@dataclass(frozen=True)
class RunPlan:
    """What one %%mpimap cell asks for, checked before anything is sent or written."""

    job: closure.CellJob
    args: list
    output: str
    options: dict  # keywords of the Sweep: retries, force, chunksize, timeout, prune, on_code_change, spelling
    out: str | None = None
    no_wait: bool = False
    profile: str | None = None
    cluster_id: str | None = None
    live: object = None  # --live FUNC: called with (args, results) finished so far


@magics_class
class MPIMapMagics(Magics):
    """The magics of one kernel; its ``session`` holds the cluster they use."""

    def __init__(self, shell):
        super().__init__(shell)
        self._last_output = None
        self.session = clustermod.ClusterSession()

    # -- %%mpimap -----------------------------------------------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument("-o", "--out", metavar="NAME", default=None,
                              help="also store the list of results, in order, in the variable NAME")
    @magic_arguments.argument("--force", action="store_true",
                              help="discard the cache and the output file; recompute every job")
    @magic_arguments.argument("--reuse", action="store_true",
                              help="the cell's code (or a value it uses) changed since the cache was written: "
                                   "keep the cached results anyway")
    @magic_arguments.argument("--retries", type=int, default=0, metavar="N",
                              help="run a failing job up to N more times before reporting it (default 0)")
    @magic_arguments.argument("--prune", action="store_true",
                              help="after success, forget stored results whose argument is not in ITERABLE "
                                   "(by default every result computed for OUTPUT is kept)")
    @magic_arguments.argument("--timeout", type=float, default=None, metavar="SECONDS",
                              help="stop a job that runs longer and record it as failed (default: no limit)")
    @magic_arguments.argument("--chunksize", type=int, default=None, metavar="K",
                              help="send K jobs per message (default: adapted to the measured job time)")
    @magic_arguments.argument("--live", metavar="FUNC", default=None,
                              help="call FUNC(args, results) in this kernel with the jobs finished so far, about "
                                   "once a second and once at the end: a plot that fills in as the run goes")
    @magic_arguments.argument("--no-wait", action="store_true",
                              help="return at once with a handle (.done(), .wait(), .result()); -o NAME is "
                                   "assigned when the run ends")
    @_cluster_options
    @magic_arguments.argument("output", help="the output file (e.g. sweep.pkl): (index, [arg], result) triples, "
                                             "the same format as Tasker.map; its cache is OUTPUT.mpi/")
    @magic_arguments.argument("loop", nargs="*", help="for TARGET in ITERABLE: the iterable is evaluated in "
                                                      "the kernel; each item becomes one job")
    @cell_magic
    def mpimap(self, line, cell):
        """Run the cell body once per item of ITERABLE on the MPI engines, cached and restartable.

        %%mpimap [options] OUTPUT for TARGET in ITERABLE

        The body is the job; its last expression is the job's result. Names it uses from the notebook
        (variables, functions, classes, modules) are sent to the engines once. Rerunning the cell reuses the
        cache: finished jobs are not computed again, an interrupted run resumes. If the cell's code changed
        since, it stops and asks for --force (recompute) or --reuse (keep). Without a cluster the jobs run
        serially in the kernel, with a warning.
        """
        plan = self._plan(line, cell)
        if self.session.connect(plan.profile, plan.cluster_id) is None:
            print(f"mpimap: no MPI cluster found; running {len(plan.args)} jobs serially in this kernel "
                  f"({clustermod.HOW_TO_START}).", file=sys.stderr)
            return self._run_here(plan)
        return self._run_on(plan)

    def _plan(self, line, cell):
        head, loop_text = closure.split_loop(line)
        try:
            opts = magic_arguments.parse_argstring(self.mpimap, head)
        except IPythonUsageError as exc:
            raise UsageError(f"{exc}. Usage: %%mpimap [options] OUTPUT for TARGET in ITERABLE") from None
        if opts.loop:
            raise UsageError(f"unexpected words before 'for': {' '.join(opts.loop)!r}; give one OUTPUT path")
        if opts.force and opts.reuse:
            raise UsageError("--force (recompute) and --reuse (keep the cache) contradict each other; pick one")
        if opts.retries < 0:
            raise UsageError(f"--retries {opts.retries}: give a number of extra attempts, 0 or more")
        if opts.chunksize is not None and opts.chunksize < 1:
            raise UsageError(f"--chunksize {opts.chunksize}: give 1 or more jobs per message (or leave it out)")
        if opts.timeout is not None and not 0 < opts.timeout < 1e9:
            raise UsageError(f"--timeout {opts.timeout}: give a number of seconds > 0 (or leave it out)")
        if opts.out is not None and not opts.out.isidentifier():
            raise UsageError(f"-o {opts.out!r} is not a valid variable name")
        live = self._live_function(opts.live)
        loop = closure.parse_loop(loop_text)
        run = RunDir(os.path.expanduser(opts.output))
        run.check_output_path()
        job = closure.build_job(loop, cell, self.shell.user_ns)
        try:
            iterable = eval(loop.iterable, self.shell.user_ns)  # noqa: S307 - the user's own expression
        except Exception as exc:  # noqa: BLE001 - any error of the user's expression is reported as usage
            raise UsageError(f"the iterable {loop.iterable!r} raised {type(exc).__name__}: {exc}") from None
        args = job_list(iterable)
        options = {"retries": opts.retries, "force": opts.force, "chunksize": opts.chunksize, "timeout": opts.timeout,
                   "prune": opts.prune, "on_code_change": "reuse" if opts.reuse else "error",
                   "spelling": MAGIC_SPELLING}
        return RunPlan(job, args, run.output, options, out=opts.out, no_wait=opts.no_wait, profile=opts.profile,
                       cluster_id=opts.cluster_id, live=live)

    def _live_function(self, name):
        if name is None:
            return None
        try:
            func = eval(name, self.shell.user_ns)  # noqa: S307 - the user's own expression
        except Exception as exc:  # noqa: BLE001 - any error of the user's expression is reported as usage
            raise UsageError(f"--live {name}: {type(exc).__name__}: {exc}; define a function "
                             f"{name}(args, results) in the notebook first") from None
        if not callable(func):
            raise UsageError(f"--live {name}: {type(func).__name__} is not callable; give a function "
                             "f(args, results)")
        return func

    def _assign(self, plan, started, where):
        """The results, read from the store on this machine's file system when they are used (never shipped
        back through the engines)."""
        values = Results(plan.output, plan.args, kind="values")
        if plan.out:
            self.shell.user_ns[plan.out] = values
        print(f"mpimap: {len(values)} results in {plan.output} ({where}, {time.time() - started:.2f} s)"
              + (f" -> {plan.out}" if plan.out else ""))
        return values

    def _view(self, plan):
        self._last_output = plan.output
        view = make_view(f"%%mpimap {os.path.basename(plan.output)}", output=plan.output)
        if plan.live is None:
            return view
        return LiveView(view, plan.live, LiveResults(plan.output, plan.args),
                        report=lambda message: print(f"mpimap: {message}", file=sys.stderr))

    @staticmethod
    def _final_live(view, values=None):
        """The last call of --live: every result when the run succeeded; the finished part when jobs failed."""
        if isinstance(view, LiveView):
            view.final(values)

    def _run_here(self, plan):
        from concurrent.futures import ThreadPoolExecutor

        from .scheduler import run_serial
        from .sweep import Sweep

        view = self._view(plan)
        sweep = Sweep(plan.job.function(), plan.args, plan.output, fingerprint=plan.job.fingerprint,
                      function_name="%%mpimap cell", monitor=StatusMonitor(view, REFRESH_SECONDS), echo_output=False,
                      **plan.options)
        started = time.time()
        if plan.no_wait:
            earlier = earlier_run(plan.output)
            executor = ThreadPoolExecutor(1)
            future = executor.submit(run_serial, sweep)
            executor.shutdown(wait=False)

            def finish_serial(done):
                return self._ended(view, lambda: done.result() or self._assign(plan, started, "serially"))

            return MapRun(future, finish_serial, plan.output, args=plan.args, since=started, earlier=earlier)
        values = self._ended(view, lambda: run_serial(sweep) or self._assign(plan, started, "serially"))
        return None if plan.out else values

    def _ended(self, view, end):
        """``end()`` (the run's end: its results, or its error), then the last call of --live."""
        try:
            values = end()
        except JobsFailed:
            self._final_live(view)
            raise
        self._final_live(view, values)
        return values

    def _run_on(self, plan):
        ranks = self.session.world()
        task = clustermod.EngineTask(plan.job, plan.args, plan.output, os.getcwd(), list(sys.path), plan.options)
        view = self._view(plan)
        earlier = earlier_run(plan.output)
        started = time.time()
        future = self.session.submit(task)
        where = f"{len(ranks) - 1} MPI workers"

        def finish(done):
            def end():
                outcome = clustermod.collect(done, plan.output)
                if not outcome.ok:
                    outcome.raise_error(on_root=True)
                return self._assign(plan, started, where)
            return self._ended(view, end)

        if plan.no_wait:
            follower = Follower(plan.output, view, background=True, since=started, earlier=earlier)
            return MapRun(future, finish, plan.output, follower, args=plan.args, since=started, earlier=earlier)
        follower = Follower(plan.output, view, since=started, earlier=earlier)
        try:
            while not future.done():
                future.wait(REFRESH_SECONDS)
                follower.refresh()
        except KeyboardInterrupt:
            self._interrupt(future, plan, follower)
        follower.stop()
        values = finish(future)
        return None if plan.out else values

    def _interrupt(self, future, plan, follower):
        """Ctrl-C / kernel interrupt: stop the engines, keep every finished record, say how to resume."""
        self.session.interrupt(future)
        follower.stop()
        raise KeyboardInterrupt(f"%%mpimap interrupted; finished jobs are kept in {plan.output}.mpi/. "
                                "Run the cell again to resume.")

    # -- %mpicluster ---------------------------------------------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument("action", choices=["start", "stop", "status"],
                              help="start: a controller and N MPI engines; stop: the cluster; status: engines "
                                   "and their MPI ranks")
    @magic_arguments.argument("-n", type=int, default=4, help="engines to start (default 4: 1 scheduler, "
                                                              "3 workers)")
    @magic_arguments.argument("--engines", default="mpi", choices=clustermod.ENGINE_LAUNCHERS,
                              help="how to start the engines: mpi (mpiexec here, default) or slurm (a Slurm "
                                   "job whose srun makes them one MPI world)")
    @_cluster_options
    @line_magic
    def mpicluster(self, line):
        """Start, stop or show the ipyparallel cluster of MPI engines that %%mpimap uses."""
        opts = magic_arguments.parse_argstring(self.mpicluster, line)
        if opts.action == "start":
            cluster_id, ranks = self.session.start(opts.n, opts.profile, opts.cluster_id, opts.engines)
            print(f"started cluster {cluster_id!r}: {len(ranks)} MPI engines (rank 0 schedules, "
                  f"{len(ranks) - 1} compute); stop it with %mpicluster stop")
        elif opts.action == "stop":
            self._stop(opts.profile, opts.cluster_id)
        elif self.session.connect(opts.profile, opts.cluster_id) is None:
            print(f"no MPI cluster is running; {clustermod.HOW_TO_START}")
        else:
            ranks = self.session.world()
            print(f"{len(ranks)} engines in one MPI world: " +
                  ", ".join(f"engine {e} = rank {r}" for e, r in sorted(ranks.items(), key=lambda x: x[1])))

    def _stop(self, profile, cluster_id):
        """One line, whatever ipyparallel has to say about the engines it stopped."""
        if not self.session.started and profile is None and cluster_id is None:
            print("no cluster was started by this kernel; give --profile/--cluster-id to stop another one")
            return
        stopped = self.session.stop(profile, cluster_id)
        if stopped is None:
            print(f"no cluster is running for profile {profile or 'default'!r}"
                  + (f" with id {cluster_id!r}" if cluster_id else ""))
        else:
            print(f"cluster {stopped!r} stopped")

    # -- %mpistatus ----------------------------------------------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument("--job", type=int, default=None, metavar="N",
                              help="print what job N printed (its stdout and stderr, the last 64 KiB) instead "
                                   "of the progress")
    @magic_arguments.argument("path", nargs="?", default=None,
                              help="a run's output file or its .mpi directory (default: this kernel's last "
                                   "%%%%mpimap run, else every run under the working directory)")
    @line_magic
    def mpistatus(self, line):
        """Show the live progress of a run: one started here, by another kernel, or by a batch script."""
        opts = magic_arguments.parse_argstring(self.mpistatus, line)
        if opts.path:
            paths = [os.path.expanduser(opts.path)]
        elif self._last_output:
            paths = [self._last_output]
        else:
            paths = progressmod.find_runs(os.getcwd(), max_depth=2)
        if opts.job is not None:
            if len(paths) != 1:
                raise UsageError("--job N needs the run's output path, e.g. %mpistatus sweep.pkl --job 5")
            self._print_job_output(paths[0], opts.job)
            return
        if not paths:
            print(f"no runs under {os.getcwd()}: give the output path, e.g. %mpistatus sweep.pkl")
            return
        for path in paths:
            snapshot = progressmod.read_progress(path)
            if snapshot.state == MISSING:
                print(snapshot.note)
                continue
            follow_run(path)


    @staticmethod
    def _print_job_output(path, index):
        text = job_output(path, index)
        if text:
            print(text, end="" if text.endswith("\n") else "\n")
        else:
            print(f"(job {index} printed nothing)")


def load(ipython):
    ipython.register_magics(MPIMapMagics)
