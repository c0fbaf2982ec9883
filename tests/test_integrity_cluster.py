"""Engines that cannot set up a run, or receive two runs in different orders, stop together with a clear
error instead of waiting forever in a collective (issue "Integrity first", suspected points confirmed)."""

import textwrap

import cloudpickle
import pytest

from conftest import CLUSTER_PROFILE
from mpitasker_ext import WorkerError, closure
from mpitasker_ext import cluster as clustermod

ON = f"--profile {CLUSTER_PROFILE}"


def test_a_value_that_cannot_be_rebuilt_on_one_engine_fails_every_engine_clearly(shell, mpi_cluster):
    shell.run_cell(textwrap.dedent("""
        def rebuild():
            from mpi4py import MPI
            if MPI.COMM_WORLD.Get_rank() == 2:
                raise ImportError("the module this needs is missing on this engine")
            return 10
        class Picky:
            def __reduce__(self):
                return (rebuild, ())
        picky = Picky()
    """))
    with pytest.raises(WorkerError, match="rank 2 could not set up the job.*missing on this engine"):
        shell.run_cell_magic("mpimap", f"{ON} picky.pkl for x in range(6)", "x if picky else None\n")
    # the engines are free again: the next run works
    assert shell.run_cell_magic("mpimap", f"{ON} fine.pkl for x in range(6)", "x * 3\n") == \
        [x * 3 for x in range(6)]


def _task(shell, tmp_path, name, body):
    job = closure.build_job(closure.parse_loop("for x in range(8)"), body, shell.user_ns)
    return cloudpickle.dumps(clustermod.EngineTask(job, list(range(8)), str(tmp_path / name), str(tmp_path), [],
                                                   {}))


def test_two_runs_reaching_the_engines_in_different_orders_stop_instead_of_mixing(shell, mpi_cluster, tmp_path):
    first, second = _task(shell, tmp_path, "a.pkl", "x + 100\n"), _task(shell, tmp_path, "b.pkl", "x + 200\n")
    ids = list(mpi_cluster.ids)
    half, rest = mpi_cluster[ids[:2]], mpi_cluster[ids[2:]]
    # engines of one half get A then B, the others B then A: what two kernels sharing a cluster can cause
    runs = [half.apply_async(clustermod.run_task, first, 1), rest.apply_async(clustermod.run_task, second, 2),
            half.apply_async(clustermod.run_task, second, 2), rest.apply_async(clustermod.run_task, first, 1)]
    for run in runs:
        for data in run.get(timeout=60):
            _rank, outcome = cloudpickle.loads(data)
            assert not outcome.ok and outcome.error_type == "WorkerError" and "received different runs" in \
                outcome.message
    assert not (tmp_path / "a.pkl").exists() and not (tmp_path / "b.pkl").exists()
    assert shell.run_cell_magic("mpimap", f"{ON} after.pkl for x in range(4)", "-x\n") == [0, -1, -2, -3]


def test_timeout_stops_a_stuck_job_on_the_engines(shell, mpi_cluster):
    from mpitasker_ext import JobsFailed

    shell.run_cell("import time\nslow = True")
    body = "if x == 4 and slow:\n    time.sleep(60)\nx\n"
    with pytest.raises(JobsFailed, match="timeout=1") as info:
        shell.run_cell_magic("mpimap", f"{ON} --timeout 1 stuck.pkl for x in range(6)", body)
    assert info.value.indices == [4]
    shell.run_cell("slow = False")
    assert shell.run_cell_magic("mpimap", f"{ON} --reuse stuck.pkl for x in range(6)", body) == list(range(6))
