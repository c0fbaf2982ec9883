"""%%mpimap and %mpicluster against a real ipcluster of MPI engines (started once per session)."""

import os
import shutil
import sys
import textwrap

import pytest
from IPython.core.error import UsageError as IPythonUsageError

from conftest import CLUSTER_ENGINES, CLUSTER_PROFILE, seed_load
from mpitasker_ext import CodeChanged, JobsFailed, UsageError
from mpitasker_ext.errors import ClusterError
from mpitasker_ext.magics import MPIMapMagics

ON = f"--profile {CLUSTER_PROFILE}"


def test_cell_becomes_a_job_with_its_notebook_closure(shell, mpi_cluster, tmp_path):
    shell.run_cell(textwrap.dedent("""
        import itertools, math
        import numpy as np
        L = 3
        def helper(b):
            return b ** 2
        def hamiltonian(a, b):
            return np.diag([a * L, helper(b)])
        class Scale:
            def __init__(self, k):
                self.k = k
            def __call__(self, v):
                return v * self.k
        twice = Scale(2)
        square = lambda v: v * v
        omegas, gammas = [1.0, 2.0], [0.5, 1.5, 2.5]
    """))
    result = shell.run_cell_magic(
        "mpimap", f"{ON} -o spectra sweep.pkl for omega, gamma in itertools.product(omegas, gammas)",
        "h = hamiltonian(omega, gamma)\nevs = np.linalg.eigvalsh(h)\n(twice(float(evs.sum())), square(gamma))\n")
    assert result is None
    expected = [(2 * (3 * o + g * g), g * g) for o in [1.0, 2.0] for g in [0.5, 1.5, 2.5]]
    assert shell.user_ns["spectra"] == expected
    triples = seed_load(tmp_path / "sweep.pkl")
    assert [t[1] for t in triples] == [[(o, g)] for o in [1.0, 2.0] for g in [0.5, 1.5, 2.5]]
    assert not (tmp_path / "sweep.pkl.mpi").exists()


def test_notebook_class_instances_as_arguments_and_results(shell, mpi_cluster, tmp_path):
    shell.run_cell(textwrap.dedent("""
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
            def norm2(self):
                return self.x ** 2 + self.y ** 2
        points = [Point(i, i + 1) for i in range(5)]
    """))
    values = shell.run_cell_magic("mpimap", f"{ON} pts.pkl for p in points", "q = Point(p.y, p.x)\n(q, q.norm2())")
    assert [n for _, n in values] == [i * i + (i + 1) ** 2 for i in range(5)]
    assert [(q.x, q.y) for q, _ in values] == [(i + 1, i) for i in range(5)]
    again = shell.run_cell_magic("mpimap", f"{ON} pts.pkl for p in points", "q = Point(p.y, p.x)\n(q, q.norm2())")
    assert [n for _, n in again] == [n for _, n in values]


def test_generator_iterable_kernel_cwd_and_sys_path(shell, mpi_cluster, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "localmod.py").write_text("def triple(x):\n    return 3 * x\n")
    (tmp_path / "offset.txt").write_text("100")
    sys.path.insert(0, str(lib))
    try:
        shell.run_cell("import localmod")
        values = shell.run_cell_magic("mpimap", f"{ON} out.pkl for x in (i for i in range(6))",
                                      "import os\nlocalmod.triple(x) + int(open('offset.txt').read()), os.getcwd()")
    finally:
        sys.path.remove(str(lib))
    assert [v for v, _ in values] == [100 + 3 * x for x in range(6)]
    assert {cwd for _, cwd in values} == {str(tmp_path)}


def test_rerun_reuses_cache_and_code_change_asks_for_a_choice(shell, mpi_cluster, tmp_path):
    log = tmp_path / "runs.log"
    shell.user_ns["LOG"] = str(log)
    shell.user_ns["k"] = 2
    cell = "with open(LOG, 'a') as f:\n    f.write(f'{x}\\n')\nx * k\n"
    assert shell.run_cell_magic("mpimap", f"{ON} c.pkl for x in range(10)", cell) == [2 * x for x in range(10)]
    assert shell.run_cell_magic("mpimap", f"{ON} c.pkl for x in range(10)", cell) == [2 * x for x in range(10)]
    assert len(log.read_text().split()) == 10
    shell.user_ns["k"] = 3                       # a value the cell uses changed
    with pytest.raises(CodeChanged, match=r"\(--force\).*\(--reuse\)"):
        shell.run_cell_magic("mpimap", f"{ON} c.pkl for x in range(10)", cell)
    assert shell.run_cell_magic("mpimap", f"{ON} --reuse c.pkl for x in range(10)", cell) == \
        [2 * x for x in range(10)]
    assert shell.run_cell_magic("mpimap", f"{ON} --force c.pkl for x in range(10)", cell) == \
        [3 * x for x in range(10)]
    assert len(log.read_text().split()) == 20


def test_job_errors_show_index_argument_and_cell_line(shell, mpi_cluster, tmp_path):
    cell = "y = x + 1\nif x in (3, 7):\n    raise ValueError(f'bad {x}')\ny\n"
    with pytest.raises(JobsFailed) as info:
        shell.run_cell_magic("mpimap", f"{ON} --retries 1 f.pkl for x in range(10)", cell)
    message = str(info.value)
    assert info.value.indices == [3, 7] and info.value.total == 10
    assert "2 of 10 jobs failed: indices 3, 7" in message and "job 3 with argument 3" in message
    assert "--retries N" in message and "retries=N" not in message   # the magic's spelling
    assert 'File "<mpimap cell>", line 3' in message and "raise ValueError(f'bad {x}')" in message
    rendered = "\n".join(info.value._render_traceback_())
    assert rendered.startswith("JobsFailed: 2 of 10 jobs failed") and "magics.py" not in rendered
    assert shell.run_cell_magic("mpimap", f"{ON} --reuse f.pkl for x in range(10)", "x + 1") == \
        list(range(1, 11))


def test_no_wait_returns_a_handle_and_assigns_later(shell, mpi_cluster, capsys):
    handle = shell.run_cell_magic("mpimap", f"{ON} --no-wait -o later nw.pkl for x in range(30)",
                                  "import time\ntime.sleep(0.02)\nif x % 2:\n    print('odd', x)\nx * x")
    assert handle.result(timeout=60) == [x * x for x in range(30)]
    assert shell.user_ns["later"] == [x * x for x in range(30)]
    assert "finished" in repr(handle) and handle.output_path.endswith("nw.pkl")
    assert (handle.output(3), handle.output(4)) == ("odd 3\n", "")
    capsys.readouterr()
    shell.run_line_magic("mpistatus", "nw.pkl --job 29")
    shell.run_line_magic("mpistatus", "--job 28")          # this kernel's last run
    assert capsys.readouterr().out == "odd 29\n(job 28 printed nothing)\n"
    with pytest.raises(UsageError, match="out of range"):
        shell.run_line_magic("mpistatus", "nw.pkl --job 30")


def test_serial_fallback_without_a_cluster_warns(shell, tmp_path, capsys):
    magics = MPIMapMagics(shell)               # a fresh instance: no client from other tests
    values = magics.mpimap("-o r serial.pkl for a, b in [(1, 2), (3, 4)]", "a * b")
    assert values is None and shell.user_ns["r"] == [2, 12]
    assert "no MPI cluster found" in capsys.readouterr().err
    assert seed_load(tmp_path / "serial.pkl") == [(0, [(1, 2)], 2), (1, [(3, 4)], 12)]


BAD_LINES = [
    ("out.pkl", "x", "needs a loop"),
    ("out.pkl for x.y in range(3)", "x", "must be a name or a tuple"),
    ("out.pkl for x in range(3", "x", "cannot read the loop"),
    ("out.pkl for x in range(3)", "x +", "syntax error on line 1"),
    ("out.pkl for x in range(3)", "", "body is empty"),
    ("--bogus out.pkl for x in range(3)", "x", "unrecognized arguments"),
    ("for x in range(3)", "x", "required: output"),
    ("nodir/out.pkl for x in range(3)", "x", "does not exist"),
    (". for x in range(3)", "x", "is a directory"),
    ("-o 1abc out.pkl for x in range(3)", "x", "not a valid variable name"),
    ("--force --reuse out.pkl for x in range(3)", "x", "contradict"),
    ("--retries many out.pkl for x in range(3)", "x", "invalid int"),
    ("out.pkl for x in no_such_iterable", "x", "NameError"),
    ("out.pkl for x in []", "x", "empty"),
    ("out.pkl for x in 42", "x", "must be an iterable"),
    ("out.pkl for x in range(3)", "x + no_such_name", "'no_such_name' is not defined in the notebook"),
    ("out.pkl for x in range(3)", "x + lock_var", "variable 'lock_var'"),
    ("out.pkl extra for x in range(3)", "x", "unexpected words"),
    ("--retries -2 out.pkl for x in range(3)", "x", "0 or more"),
    ("--chunksize 0 out.pkl for x in range(3)", "x", "1 or more jobs per message"),
]


@pytest.mark.parametrize("line, cell, message", BAD_LINES)
def test_malformed_lines_launch_nothing_and_write_nothing(shell, mpi_cluster, tmp_path, line, cell, message):
    import threading
    shell.user_ns["lock_var"] = threading.Lock()
    shell.run_cell_magic("mpimap", f"{ON} ok.pkl for x in range(2)", "x")   # connect, check the world
    os.remove(tmp_path / "ok.pkl")
    os.remove(tmp_path / "ok.pkl.code.json")
    shutil.rmtree(tmp_path / "ok.pkl.cache")
    magics = shell.magics_manager.registry["MPIMapMagics"]
    sent_before = len(magics.session.client.history)
    expected = IPythonUsageError if cell == "" else UsageError        # IPython itself refuses an empty cell
    with pytest.raises(expected, match=message):
        shell.run_cell_magic("mpimap", f"{ON} {line}", cell)
    assert len(magics.session.client.history) == sent_before
    assert os.listdir(tmp_path) == []


def test_help_documents_every_option():
    doc = MPIMapMagics.mpimap.__doc__
    for option in ("--out", "--force", "--reuse", "--retries", "--chunksize", "--no-wait", "--profile",
                   "--cluster-id", "for TARGET in ITERABLE"):
        assert option in doc, option


def test_mpicluster_status_reports_one_world(shell, mpi_cluster, capsys):
    shell.run_line_magic("mpicluster", f"status {ON}")
    out = capsys.readouterr().out
    assert f"{CLUSTER_ENGINES} engines in one MPI world" in out and "rank 0" in out


def test_mpicluster_names_a_missing_cluster_and_stops_nothing_it_did_not_start(shell, capsys):
    magics = MPIMapMagics(shell)
    with pytest.raises(ClusterError, match="no cluster is running for profile 'nosuch'.*%mpicluster start"):
        magics.mpicluster("status --profile nosuch")
    magics.mpicluster("stop")
    magics.mpicluster("stop --profile nosuch")
    assert capsys.readouterr().out.splitlines() == [
        "no cluster was started by this kernel; give --profile/--cluster-id to stop another one",
        "no cluster is running for profile 'nosuch'"]
