"""Results at scale: a job is what it computes (reuse wherever its argument appears), results stay on disk and are
read when used, the output is streamed (issue "Results at scale")."""

import os
import pickle

import pytest

from conftest import seed_load
from mpitasker_ext import load, mpimap
from mpitasker_ext.results import Results

GRID_JOB = """
import os, sys
from mpitasker_ext import Tasker
def f(x):
    fd = os.open('exec.log', os.O_WRONLY | os.O_APPEND | os.O_CREAT); os.write(fd, f'{x}\\n'.encode()); os.close(fd)
    return x * x
grids = {'base': list(range(1, 101)), 'extend': list(range(1, 111)), 'reverse': list(range(1, 111))[::-1],
         'subset': list(range(1, 111, 2)), 'insert': [0] + list(range(1, 111)),
         'coarse': [x * 0.5 for x in range(0, 41, 2)], 'fine': [x * 0.5 for x in range(0, 41)],
         'twice': [3, 3, 1000, 1000, 1000, 5]}
g = grids[sys.argv[1]]
with Tasker(progress=False, prune=len(sys.argv) > 2) as t:
    data = t.map('grid.pkl', f, g)
ok = [r for (_, _, r) in data] == [x * x for x in g] and [a for (_, a, _) in data] == [[x] for x in g]
print('RESULT', t.rank, type(data).__name__, ok, flush=True)
"""


def _step(runner, script, grid, *extra):
    if os.path.exists(runner.path("exec.log")):
        os.unlink(runner.path("exec.log"))
    proc = runner.run(script, 3, grid, *extra, timeout=120)
    assert proc.stdout.count("RESULT") == 3 and proc.stdout.count("True") == 3, proc.stdout + proc.stderr
    assert "Results" in proc.stdout                     # every rank holds a lazy sequence, not the values
    if not os.path.exists(runner.path("exec.log")):
        return []
    with open(runner.path("exec.log")) as f:
        return [float(line) for line in f if line.strip()]


@pytest.mark.mpi
def test_a_job_is_what_it_computes_wherever_its_argument_appears(runner):
    script = runner.write("grid.py", GRID_JOB)
    counts = {grid: len(_step(runner, script, grid))
              for grid in ("base", "extend", "reverse", "subset", "insert", "coarse", "fine")}
    assert counts == {"base": 100, "extend": 10, "reverse": 0, "subset": 0, "insert": 1, "coarse": 21, "fine": 20}
    assert not os.path.exists(runner.path("grid.pkl.mpi"))
    data = seed_load(runner.path("grid.pkl"))
    assert [tuple(t) for t in data] == [(i, [x * 0.5], (x * 0.5) ** 2) for i, x in enumerate(range(41))]


@pytest.mark.mpi
def test_repeated_arguments_run_once_and_prune_forgets_the_rest(runner):
    script = runner.write("grid.py", GRID_JOB)
    assert sorted(_step(runner, script, "twice")) == [3, 5, 1000]
    _step(runner, script, "base", "prune")               # keeps only 1..100
    assert sorted(_step(runner, script, "twice")) == [1000]


def test_load_reads_one_result_at_a_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = mpimap(lambda x: {"x": x, "sq": x * x}, range(50), "l.pkl", comm=None, progress=False)
    assert isinstance(values, Results) and values[7] == {"x": 7, "sq": 49} and len(values) == 50
    triples = load("l.pkl")
    assert triples[-1] == (49, [49], {"x": 49, "sq": 2401}) and triples[10:12] == [
        (10, [10], {"x": 10, "sq": 100}), (11, [11], {"x": 11, "sq": 121})]
    assert mpimap(lambda x: x, range(3), "m.pkl", comm=None, progress=False, in_memory=True) == [0, 1, 2]
    assert type(mpimap(lambda x: x, range(3), "m.pkl", comm=None, progress=False, in_memory=True)) is list


def test_a_plain_output_without_a_store_is_adopted_once(tmp_path, monkeypatch):
    """An output of the blog post's Tasker (or an older version): its results are reused, then kept in the store."""
    monkeypatch.chdir(tmp_path)
    with open("old.pkl", "wb") as f:
        pickle.dump(([(i, [i], f"old{i}") for i in range(5)],), f)
    calls = []
    values = mpimap(lambda x: calls.append(x) or f"new{x}", range(7), "old.pkl", comm=None, progress=False)
    assert list(values) == [f"old{i}" for i in range(5)] + ["new5", "new6"] and calls == [5, 6]
    os.unlink("old.pkl")                                 # the store still has every result
    calls.clear()
    assert list(mpimap(lambda x: calls.append(x) or f"new{x}", range(7), "old.pkl", comm=None,
                       progress=False))[:2] == ["old0", "old1"]
    assert calls == []


def test_force_forgets_every_stored_result(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mpimap(lambda x: x, range(5), "f.pkl", comm=None, progress=False)
    calls = []
    mpimap(lambda x: calls.append(x) or x, range(3), "f.pkl", comm=None, progress=False, force=True)
    assert calls == [0, 1, 2]
    calls.clear()
    mpimap(lambda x: calls.append(x) or x, range(5), "f.pkl", comm=None, progress=False)
    assert calls == [3, 4]


BIG_JOB = """
import resource, sys
import numpy as np
from mpi4py import MPI
from mpitasker_ext import Tasker
LIMIT = int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_DATA, (LIMIT, LIMIT))   # private memory of this rank, arrays included
def f(i):
    return np.full(1_000_000, float(i))                    # 8 MB each, 60 of them: 480 MB in all
with Tasker(progress=False) as t:
    data = t.map('big.pkl', f, range(60))
total = sum(float(v[5]) for (_, _, v) in data)             # every rank reads every result, one at a time
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print('RESULT', MPI.COMM_WORLD.rank, total == sum(range(60)), f'{peak:.0f}', flush=True)
"""


@pytest.mark.mpi
def test_results_larger_than_a_ranks_memory_limit(runner):
    """Each rank may hold 300 MiB of private data; the results are 480 MB: they never sit in one process."""
    proc = runner.run(runner.write("big.py", BIG_JOB), 3, 300, timeout=180)
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 3 and all(line[2] == "True" for line in lines), proc.stdout + proc.stderr
    assert max(int(line[3]) for line in lines) < 300


def test_notebook_results_come_from_the_store_not_through_the_engines(mpi_cluster, tmp_path, monkeypatch):
    """-o NAME is a lazy list-like read from OUTPUT.cache/ by the kernel; engines reply with a status only."""
    from IPython.core.interactiveshell import InteractiveShell

    from conftest import CLUSTER_PROFILE
    from mpitasker_ext import cluster as clustermod

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "mpitasker_ext")
    monkeypatch.chdir(tmp_path)
    replies = []
    collect = clustermod.collect
    monkeypatch.setattr(clustermod, "collect", lambda future, output: replies.append(future.get()) or
                        collect(future, output))
    shell.run_cell("import numpy as np")
    shell.run_cell_magic("mpimap", f"--profile {CLUSTER_PROFILE} -o spectra big.pkl for i in range(30)",
                         "np.full(100_000, float(i))\n")
    spectra = shell.user_ns["spectra"]
    assert isinstance(spectra, Results) and len(spectra) == 30
    assert [float(v[7]) for v in spectra] == [float(i) for i in range(30)]
    assert max(len(data) for data in replies[0]) < 2000       # 24 MB of results, none of it in the replies
    assert [t[0] for t in load(str(tmp_path / "big.pkl"))] == list(range(30))
    del shell.user_ns["spectra"], shell.user_ns["np"]


def test_results_of_other_code_are_found_by_their_own_code_after_an_interrupted_run(tmp_path, monkeypatch):
    """v1 finishes; v2 reuses them under 'warn' and is interrupted; 'recompute' must then recompute v1's jobs,
    and 'error' must ask: a result is never relabelled with the code of a run that merely reused it."""
    monkeypatch.chdir(tmp_path)
    version = {"v": 1, "stop": None}

    def job(x):
        if x == version["stop"]:
            raise KeyboardInterrupt
        return (version["v"], x)
    mpimap(job, range(6), "c.pkl", comm=None, progress=False)
    version.update(v=2, stop=8)
    with pytest.raises(KeyboardInterrupt):
        mpimap(job, range(10), "c.pkl", comm=None, progress=False)        # warn: reuses v1's, stops at 8
    version["stop"] = None
    from mpitasker_ext import CodeChanged
    with pytest.raises(CodeChanged):
        mpimap(job, range(10), "c.pkl", comm=None, progress=False, on_code_change="error")
    values = mpimap(job, range(10), "c.pkl", comm=None, progress=False, on_code_change="recompute")
    assert list(values) == [(2, x) for x in range(10)]


def test_a_force_stopped_after_the_store_went_never_brings_the_old_output_back(tmp_path, monkeypatch):
    from mpitasker_ext import store
    monkeypatch.chdir(tmp_path)
    data = {"value": "old"}
    mpimap(lambda x: (data["value"], x), range(3), "o.pkl", comm=None, progress=False)
    data["value"] = "new"

    def stop_after_discard(self, discard=store.ResultStore.discard):
        discard(self)
        raise KeyboardInterrupt
    monkeypatch.setattr(store.ResultStore, "discard", stop_after_discard)
    with pytest.raises(KeyboardInterrupt):
        mpimap(lambda x: (data["value"], x), range(3), "o.pkl", comm=None, progress=False, force=True)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert list(mpimap(lambda x: (data["value"], x), range(3), "o.pkl", comm=None, progress=False)) == \
        [("new", x) for x in range(3)]
