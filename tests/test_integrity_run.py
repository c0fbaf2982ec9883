"""Runs that used to hang, return stale results or grow without bound (issue "Integrity first", points 3, 5, 6,
8 and the scheduler's suspected hangs). Each test fails on e859117."""

import os
import pickle
import signal
import sys

import pytest

from conftest import unloadable_payload
from mpitasker_ext import JobsFailed, mpimap
from mpitasker_ext.errors import CodeChanged
from mpitasker_ext.results import Results
from mpitasker_ext.scheduler import run_serial as _run_serial
from mpitasker_ext.sweep import Sweep


def run_serial(sweep):
    """The serial run, returning its values as a list (they stay in the store)."""
    _run_serial(sweep)
    return list(Results(os.path.abspath(sweep.output), sweep.args, kind="values"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("str() of this error fails")


def _exits_or_fails(x):
    if x == 3:
        sys.exit(3)
    if x == 5:
        raise BadStr()
    if x == 6:
        raise SystemExit("bye")
    return x * 2


def test_sys_exit_and_unprintable_errors_are_recorded_failures_serially(in_tmp):
    with pytest.raises(JobsFailed) as info:
        mpimap(_exits_or_fails, range(8), "e.pkl", comm=None, progress=False)
    assert info.value.indices == [3, 5, 6]
    assert "the job called sys.exit(3)" in str(info.value)
    assert "BadStr" in info.value.failures[5]
    calls = []
    assert mpimap(lambda x: calls.append(x) or x * 2, range(8), "e.pkl", comm=None, progress=False) == \
        [x * 2 for x in range(8)]
    assert sorted(calls) == [3, 5, 6]


EXIT_SCRIPT = """
import os, sys
from mpitasker_ext import Tasker, JobsFailed
class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("no str")
def job(x):
    fd = os.open('exec.log', os.O_WRONLY | os.O_APPEND | os.O_CREAT); os.write(fd, f'{x}\\n'.encode()); os.close(fd)
    if os.environ.get('BREAK') and x == 7:
        sys.exit(3)
    if os.environ.get('BREAK') and x == 11:
        raise BadStr()
    return x + 1
with Tasker(progress=False) as t:
    try:
        data = t.map('out.pkl', job, range(30))
        print('RESULT', t.rank, [r for _, _, r in data] == [x + 1 for x in range(30)], flush=True)
    except JobsFailed as exc:
        print('FAILED', t.rank, exc.indices if t.rank == 0 else '-', flush=True)
"""


@pytest.mark.mpi
def test_sys_exit_in_a_job_under_mpi_is_a_failure_not_a_hang(runner, monkeypatch):
    script = runner.write("exit.py", EXIT_SCRIPT)
    monkeypatch.setenv("BREAK", "1")
    proc = runner.run(script, 3, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "FAILED 0 [7, 11]" in proc.stdout and proc.stdout.count("FAILED") == 3
    monkeypatch.delenv("BREAK")
    os.unlink(runner.path("exec.log"))
    proc = runner.run(script, 3, timeout=90)
    assert proc.stdout.count("RESULT") == 3 and "False" not in proc.stdout
    assert sorted(runner.executions()) == [7, 11]


def _job_a(x):
    return ("A", x)


def _job_b(x, stop_at=None):
    if stop_at is not None and x == stop_at:
        raise KeyboardInterrupt
    return ("B", x)


def _notebook_sweep(fn, fingerprint, output, n, **options):
    """What %%mpimap runs: the 'error' code-change rule and the fingerprint kept beside the output."""
    return Sweep(fn, list(range(n)), output, fingerprint=fingerprint, function_name="%%mpimap cell",
                 on_code_change=options.pop("on_code_change", "error"), **options)


def test_an_interrupted_force_run_resumes_and_never_returns_the_older_output(in_tmp):
    assert run_serial(_notebook_sweep(_job_a, "code-A", "nb.pkl", 10)) == [("A", x) for x in range(10)]
    calls, stop_at = [], [6]

    def job_b(x):
        calls.append(x)
        return _job_b(x, stop_at=stop_at[0])
    with pytest.raises(KeyboardInterrupt):
        run_serial(_notebook_sweep(job_b, "code-B", "nb.pkl", 10, force=True))
    assert calls == list(range(7))
    calls.clear()
    stop_at[0] = None
    # a plain rerun of code B resumes B's records: no CodeChanged, never A's results
    assert run_serial(_notebook_sweep(job_b, "code-B", "nb.pkl", 10)) == [("B", x) for x in range(10)]
    assert calls == [6, 7, 8, 9]
    # and now the output is B's, so code A asks for a choice
    with pytest.raises(CodeChanged):
        run_serial(_notebook_sweep(_job_a, "code-A", "nb.pkl", 10))


def test_reuse_after_an_interrupted_force_run_gives_its_results_not_the_older_output(in_tmp):
    run_serial(_notebook_sweep(_job_a, "code-A", "nb.pkl", 6))
    with pytest.raises(KeyboardInterrupt):
        run_serial(_notebook_sweep(lambda x: _job_b(x, stop_at=3), "code-B", "nb.pkl", 6, force=True))
    values = run_serial(_notebook_sweep(_job_b, "code-B", "nb.pkl", 6, on_code_change="reuse"))
    assert values == [("B", x) for x in range(6)]


def test_script_rerun_after_an_interrupted_force_run_resumes_it(in_tmp):
    assert mpimap(_job_a, range(8), "s.pkl", comm=None, progress=False) == [("A", x) for x in range(8)]
    with pytest.raises(KeyboardInterrupt):
        mpimap(lambda x: _job_b(x, stop_at=4), range(8), "s.pkl", comm=None, progress=False, force=True)
    calls = []
    values = mpimap(lambda x: calls.append(x) or _job_b(x), range(8), "s.pkl", comm=None, progress=False)
    assert values == [("B", x) for x in range(8)]
    assert calls == [4, 5, 6, 7]
    assert not os.path.exists("s.pkl.mpi")


def test_restarts_do_not_copy_the_output_again_and_again(in_tmp):
    def stored_bytes():
        return sum(p.stat().st_size for d in ("g.pkl.mpi", "g.pkl.cache") if (in_tmp / d).exists()
                   for p in (in_tmp / d).iterdir())
    big = lambda x: bytes(1_000_000)  # noqa: E731 - 1 MB per result
    mpimap(big, range(20), "g.pkl", comm=None, progress=False)
    sizes = []
    for restart in range(3):
        def job(x, restart=restart):
            if x == 20 + restart:
                raise KeyboardInterrupt
            return bytes(1_000_000)
        with pytest.raises(KeyboardInterrupt):
            mpimap(job, range(25), "g.pkl", comm=None, progress=False)
        sizes.append(stored_bytes())
    assert sizes[0] > 20_000_000
    assert sizes[2] - sizes[0] < 3_000_000, sizes      # the 20 stored results are never copied again


def test_a_stored_result_that_no_longer_loads_is_computed_again_in_the_same_run(in_tmp, caplog):
    """Whatever order the journals' names sort in: the damaged copy is set aside, the job computed again."""
    from mpitasker_ext.identity import args_digest, code_fingerprint
    from mpitasker_ext.journal import JournalWriter
    from mpitasker_ext.payload import encode_value
    from mpitasker_ext.rundir import RunDir

    def square(x):
        return x * x
    run = RunDir("order.pkl")
    run.create()
    run.write_manifest(4, code_fingerprint(square), "square")
    good = encode_value(4)
    first = JournalWriter(run.path("journal-r00000-00000000.bin"), 0)
    first.append(2, True, args_digest(2), 0.0, unloadable_payload())
    first.close()
    second = JournalWriter(run.path("journal-r00000-ffffffff.bin"), 0)
    second.append_value(2, args_digest(2), 0.0, good)
    second.close()
    calls = []
    with caplog.at_level("WARNING"):
        values = mpimap(lambda x: calls.append(x) or x * x, range(4), "order.pkl", comm=None, progress=False)
    assert list(values) == [0, 1, 4, 9]
    with open("order.pkl", "rb") as f:
        assert pickle.load(f) == ([(i, [i], i * i) for i in range(4)],)
    assert sorted(calls) == [0, 1, 2, 3]                # 2 again, on rank 0, when its stored copy would not load
    calls.clear()
    assert list(mpimap(lambda x: calls.append(x) or x * x, range(4), "order.pkl", comm=None, progress=False)) == \
        [0, 1, 4, 9]
    assert calls == []


def test_a_job_past_its_timeout_is_a_failure_and_the_run_goes_on(in_tmp):
    import time

    def slow(x):
        if x == 2:
            time.sleep(30)
        return x
    started = time.monotonic()
    with pytest.raises(JobsFailed, match="timeout=0.5") as info:
        mpimap(slow, range(5), "t.pkl", comm=None, progress=False, timeout=0.5)
    assert info.value.indices == [2] and time.monotonic() - started < 20
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_broken_progress_stream_does_not_stop_the_run(in_tmp, monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    assert mpimap(abs, range(-50, 0), "p.pkl", comm=None) == list(range(50, 0, -1))


TIMEOUT_SCRIPT = """
import time
from mpitasker_ext import Tasker, JobsFailed
def job(x):
    if x == 4:
        time.sleep(60)
    return x
with Tasker(progress=False, timeout=1.0) as t:
    try:
        t.map('out.pkl', job, range(12))
    except JobsFailed as exc:
        print('FAILED', t.rank, exc.indices if t.rank == 0 else '-', flush=True)
"""


@pytest.mark.mpi
def test_timeout_under_mpi(runner):
    proc = runner.run(runner.write("timeout.py", TIMEOUT_SCRIPT), 3, timeout=50)
    assert "FAILED 0 [4]" in proc.stdout and proc.stdout.count("FAILED") == 3


INTERRUPT_SCRIPT = """
import os, signal
from mpitasker_ext import Tasker, WorkerError
def job(x):
    fd = os.open('exec.log', os.O_WRONLY | os.O_APPEND | os.O_CREAT); os.write(fd, f'{x}\\n'.encode()); os.close(fd)
    if x == 40 and os.environ.get('BREAK'):
        raise KeyboardInterrupt   # as if this one rank got Ctrl-C
    return x
with Tasker(progress=False, chunksize=1) as t:
    try:
        data = t.map('out.pkl', job, range(80))
        print('RESULT', t.rank, [r for _, _, r in data] == list(range(80)), flush=True)
    except WorkerError as exc:
        print('STOPPED', t.rank, str(exc).splitlines()[0], flush=True)
    except KeyboardInterrupt:
        print('INTERRUPTED', t.rank, flush=True)
"""


@pytest.mark.mpi
def test_an_interrupted_worker_stops_the_run_cleanly_and_the_rerun_resumes(runner, monkeypatch):
    script = runner.write("interrupt.py", INTERRUPT_SCRIPT)
    monkeypatch.setenv("BREAK", "1")
    proc = runner.run(script, 3, timeout=60, check=False)
    assert "STOPPED 0" in proc.stdout and "interrupted" in proc.stdout, proc.stdout + proc.stderr
    assert "INTERRUPTED" in proc.stdout
    first = runner.executions()
    monkeypatch.delenv("BREAK")
    os.unlink(runner.path("exec.log"))
    proc = runner.run(script, 3, timeout=60)
    assert proc.stdout.count("RESULT") == 3 and "False" not in proc.stdout
    rerun = runner.executions()
    assert 40 in rerun and not set(rerun) & (set(first) - {40})


def test_a_job_that_swallows_its_timeout_is_still_stopped_and_failed(in_tmp):
    import time

    def stubborn(x):
        if x == 1:
            for _ in range(4):
                try:
                    time.sleep(1)
                    return x
                except BaseException:  # noqa: BLE001 - the job fights the stop on purpose
                    continue
        return x
    started = time.monotonic()
    with pytest.raises(JobsFailed, match="timeout=0.5") as info:
        mpimap(stubborn, range(3), "s.pkl", comm=None, progress=False, timeout=0.5)
    assert info.value.indices == [1] and time.monotonic() - started < 15   # stopped again every second


def test_scripts_apply_the_code_change_policy_to_finished_results(in_tmp):
    """Not only the notebook: a script asking on_code_change='error' is asked, even after a finished run."""
    mpimap(lambda x: x * 2, range(3), "p.pkl", comm=None, progress=False)
    with pytest.raises(CodeChanged):
        mpimap(lambda x: x * 5, range(3), "p.pkl", comm=None, progress=False, on_code_change="error")
    assert list(mpimap(lambda x: x * 5, range(3), "p.pkl", comm=None, progress=False,
                       on_code_change="recompute")) == [0, 5, 10]


CLOSE_FAILS = """
import errno, os
from mpi4py import MPI
import mpitasker_ext.journal as j
from mpitasker_ext import mpimap, WorkerError
if MPI.COMM_WORLD.rank == 1:
    real_close = j.JournalWriter.close
    def close(self):
        real_close(self)
        raise OSError(errno.EIO, "simulated fsync failure at close")
    j.JournalWriter.close = close
try:
    mpimap(lambda x: x * 2, range(6), "out.pkl", progress=False)
    print("RESULT", MPI.COMM_WORLD.rank, "finished", flush=True)
except WorkerError as exc:
    print("RESULT", MPI.COMM_WORLD.rank, "WorkerError", str(exc).splitlines()[0], flush=True)
except OSError as exc:
    print("RESULT", MPI.COMM_WORLD.rank, "OSError", flush=True)
"""


@pytest.mark.mpi
def test_a_worker_failing_to_close_its_journal_is_reported_not_waited_for(runner):
    proc = runner.run(runner.write("close.py", CLOSE_FAILS), 3, timeout=60, check=False)
    assert "RESULT 0 WorkerError" in proc.stdout and "cannot close its journal" in proc.stdout, \
        proc.stdout + proc.stderr
