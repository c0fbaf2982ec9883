"""Bad Tasker.map / mpimap arguments: each a clear error that names the problem, nothing run, no file written.
(The malformed %%mpimap lines are the BAD_LINES table in test_magics.py: 20 more cases.)"""

import os
import threading

import pytest

from conftest import tmpfs
from mpitasker_ext import Tasker, UsageError, mpimap, tasker


def calls_fn(x):
    raise AssertionError("no job may run on bad input")


@pytest.fixture
def readonly_dir(tmp_path):
    unmount = tmpfs(tmp_path / "ro", "size=64k,ro")
    yield tmp_path / "ro"
    unmount()


CASES = [
    ("non-iterable int", dict(args=5), "must be an iterable"),
    ("None as args", dict(args=None), "must be an iterable"),
    ("a string", dict(args="abc"), "pass a list of job arguments"),
    ("bytes", dict(args=b"xy"), "pass a list of job arguments"),
    ("empty list", dict(args=[]), "args is empty"),
    ("exhausted generator", dict(args=iter([])), "exhausted generator"),
    ("huge range", dict(args=range(10 ** 12)), "more than one map handles"),
    ("output is a directory", dict(output="."), "is a directory"),
    ("output directory missing", dict(output="no/such/dir/out.pkl"), "does not exist"),
    ("empty output path", dict(output=""), "output path is empty"),
    ("function not callable", dict(fn=42), "must be callable"),
    ("unpicklable argument", dict(args=[1, threading.Lock(), 3]), "argument of job 1"),
    ("negative retries", dict(retries=-1), "retries=-1"),
    ("retries not a number", dict(retries="2"), "retries='2'"),
    ("chunksize zero", dict(chunksize=0), "chunksize=0"),
    ("unknown code-change policy", dict(on_code_change="sometimes"), "on_code_change='sometimes'"),
]


@pytest.mark.parametrize("api", ["Tasker.map", "mpimap"])
@pytest.mark.parametrize("name, override, message", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_are_named_and_nothing_is_written(tmp_path, monkeypatch, api, name, override, message):
    monkeypatch.chdir(tmp_path)
    call = dict(fn=calls_fn, args=[1, 2, 3], output="out.pkl")
    call.update(override)
    options = {k: call.pop(k) for k in ("retries", "chunksize", "on_code_change") if k in call}
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("?", r"\?")):
        if api == "mpimap":
            mpimap(call["fn"], call["args"], call["output"], comm=None, progress=False, **options)
        else:
            Tasker(method="serial", progress=False).map(call["output"], call["fn"], call["args"], **options)
    assert os.listdir(tmp_path) == []


def test_unwritable_output_directory(readonly_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="is not writable"):
        mpimap(calls_fn, [1, 2], str(readonly_dir / "out.pkl"), progress=False)
    assert os.listdir(readonly_dir) == []


def test_an_endless_generator_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(tasker, "MAX_JOBS", 1000)
    monkeypatch.chdir(tmp_path)

    def endless():
        n = 0
        while True:
            yield n
            n += 1
    with pytest.raises(UsageError, match="yields more than 1,000 jobs"):
        mpimap(calls_fn, endless(), "out.pkl", progress=False)
    assert os.listdir(tmp_path) == []


def test_every_rank_raises_the_same_usage_error_under_mpiexec(runner):
    runner.write("job.py", """
        import threading
        from mpi4py import MPI
        from mpitasker_ext import mpimap, UsageError
        def work(x):
            open('ran', 'w').close()
        try:
            mpimap(work, [1, threading.Lock()], 'out.pkl')
        except UsageError as exc:
            print('RANK', MPI.COMM_WORLD.rank, 'argument of job 1' in str(exc), flush=True)
    """)
    proc = runner.run("job.py", 3)
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK")) == \
        [f"RANK {r} True" for r in range(3)]
    assert sorted(os.listdir(runner.workdir)) == ["job.py"]
