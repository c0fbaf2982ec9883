"""A real single-node Slurm: the batch examples, srun --mpi=pmi2, scancel and wall-time kills with resubmission,
and %%mpimap on ipyparallel engines that Slurm started."""

import os
import re
import shutil
import time

import pytest
from slurm_cluster import Slurm

from conftest import BIN, REPO, seed_load
from mpitasker_ext.rundir import RunDir

EXAMPLES = os.path.join(REPO, "examples", "slurm")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sweep_dir(tmp_path):
    for name in os.listdir(EXAMPLES):
        shutil.copy(os.path.join(EXAMPLES, name), tmp_path)
    return tmp_path


def job_env(**extra):
    return dict(MPITASKER_VENV=os.path.dirname(BIN), PYTHONPATH=REPO, PATH=BIN + os.pathsep + os.environ["PATH"],
                **extra)


def expected(points=60):
    import itertools
    import math
    omegas = [0.5 + 0.05 * i for i in range(20)]
    grid = list(itertools.product(omegas, [0.1, 0.3, 1.0]))[:points]
    return [1 / math.sqrt((1 - o ** 2) ** 2 + (g * o) ** 2) for o, g in grid]


def output_of(sweep_dir, pattern, job):
    return (sweep_dir / pattern.format(job)).read_text()


@pytest.mark.parametrize("script, log", [("sweep.sbatch", "sweep-{}.out"), ("sweep-srun.sbatch", "sweep-srun-{}.out")])
def test_batch_examples_run_the_sweep(slurm, sweep_dir, script, log):
    job = slurm.sbatch(script, cwd=sweep_dir, env=job_env(SWEEP_SECONDS_PER_POINT="0.05"))
    state = slurm.wait(job)
    text = output_of(sweep_dir, log, job)
    assert state == "COMPLETED", text + slurm.logs()
    assert "60 points in sweep.pkl" in text
    assert "     3            -    20       0" in text              # three workers, twenty points each
    assert [r for _, _, r in seed_load(sweep_dir / "sweep.pkl")] == pytest.approx(expected())
    assert not (sweep_dir / "sweep.pkl.mpi").exists()


def finished_records(run_dir):
    return {rec.index for rec in RunDir(str(run_dir)[:-4]).read_records() if rec.ok}


def wait_for_records(slurm, job, run_dir, count, log, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and len(finished_records(run_dir)) < count:
        time.sleep(0.2)
    if len(finished_records(run_dir)) < count:
        output = log.read_text() if log.exists() else "(no output yet)"
        pytest.fail(f"job {job} ({slurm.state(job)}) finished fewer than {count} points in {timeout} s:\n"
                    f"{output}\n{slurm.logs()}")


def test_scancel_mid_run_then_resubmit_resumes(slurm, sweep_dir):
    env = job_env(SWEEP_SECONDS_PER_POINT="0.5")
    job = slurm.sbatch("sweep.sbatch", cwd=sweep_dir, env=env)
    run_dir = sweep_dir / "sweep.pkl.mpi"
    wait_for_records(slurm, job, run_dir, 15, sweep_dir / f"sweep-{job}.out")
    slurm.run(["scancel", job])
    assert slurm.wait(job) == "CANCELLED"
    time.sleep(1)
    kept = finished_records(run_dir)
    assert 15 <= len(kept) < 60
    again = slurm.sbatch("sweep.sbatch", cwd=sweep_dir, env=env)
    assert slurm.wait(again) == "COMPLETED", output_of(sweep_dir, "sweep-{}.out", again)
    text = output_of(sweep_dir, "sweep-{}.out", again)
    cached = int(re.search(r"finished \| 60/60 done \((\d+) cached\)", text).group(1))
    assert cached == len(kept), text                   # exactly the finished points were reused
    assert [r for _, _, r in seed_load(sweep_dir / "sweep.pkl")] == pytest.approx(expected())


def test_wall_time_kill_and_resubmission_chain_finish_the_sweep(slurm, sweep_dir):
    """submit-until-done.sh: 1-minute links; the first dies at its wall time, the second resumes and ends."""
    env = job_env(SWEEP_SECONDS_PER_POINT="5")
    out = slurm.run(["bash", "submit-until-done.sh", "3", "--time=1"], cwd=sweep_dir, env=env).stdout
    jobs = re.findall(r"submitted (\d+)", out)
    assert len(jobs) == 3
    assert slurm.wait(jobs[0], timeout=240) == "TIMEOUT"
    kept = finished_records(sweep_dir / "sweep.pkl.mpi")
    assert 0 < len(kept) < 60
    assert slurm.wait(jobs[1], timeout=240) == "COMPLETED", slurm.logs()
    text = output_of(sweep_dir, "sweep-{}.out", jobs[1])
    assert re.search(r"finished \| 60/60 done \((\d+) cached\)", text).group(1) == str(len(kept))
    assert [r for _, _, r in seed_load(sweep_dir / "sweep.pkl")] == pytest.approx(expected())
    assert slurm.wait(jobs[2], timeout=60) == "CANCELLED"       # not needed: dropped by its dependency


def test_mpimap_on_ipyparallel_slurm_engines(slurm, tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mpitasker_ext")
    out = ip.run_line_magic("mpicluster", "start -n 4 --engines slurm --profile slurmtest")
    assert out is None
    try:
        values = ip.run_cell_magic("mpimap", "--profile slurmtest s.pkl for x in range(40)",
                                   "import os\n(x * x, os.environ.get('SLURM_JOB_ID'))")
        assert [v for v, _ in values] == [x * x for x in range(40)]
        assert {job for _, job in values} != {None}           # computed inside the Slurm allocation
    finally:
        ip.run_line_magic("mpicluster", "stop --profile slurmtest")


def test_slurm_engines_without_mpi_plugin_get_the_fix_named(slurm, tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    from mpitasker_ext.errors import ClusterError
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    monkeypatch.setenv("SLURM_MPI_TYPE", "none")
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mpitasker_ext")
    try:
        with pytest.raises(ClusterError, match="SLURM_MPI_TYPE=pmi2.*The engines were stopped"):
            ip.run_line_magic("mpicluster", "start -n 3 --engines slurm --profile slurmnompi")
    finally:
        ip.run_line_magic("mpicluster", "stop --profile slurmnompi")
    assert not (tmp_path / "s.pkl").exists()

