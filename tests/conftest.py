"""Helpers to run real scripts under a real mpiexec (MPICH from the environment's bin/), and the few readers
of what a run leaves that several test files need."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_PROFILE = "mpitest"
CHROMIUM = "/usr/bin/chromium"      # Debian's; the test command installs it when missing
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
CLUSTER_ENGINES = 4


SHM = "/dev/shm"
_shm_before = set()


def _mpich_segments():
    try:
        return {n for n in os.listdir(SHM) if n.startswith("mpich_shm_")}
    except FileNotFoundError:
        return set()


def pytest_configure(config):
    """Isolate IPython profiles (and so clusters) from the user's, and find this environment's mpiexec."""
    import tempfile
    os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="mpitasker-ipython-")
    os.environ["PATH"] = BIN + os.pathsep + os.environ.get("PATH", "")
    _shm_before.update(_mpich_segments())


def pytest_unconfigure(config):
    """MPI jobs this suite kills on purpose leave MPICH shared-memory segments in /dev/shm (RAM); every
    process of the suite has ended by now, so remove the ones it created."""
    for name in _mpich_segments() - _shm_before:
        try:
            os.unlink(os.path.join(SHM, name))
        except OSError:
            pass


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tmpfs(path, options):
    """Mount a tmpfs (the tests run as root, as CI does); returns a function that unmounts it."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs with {options} (the tests need root): {proc.stderr}")
    return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)


def wait_for_jupyter(base, token, proc, log_path, timeout=60):
    """Poll a Jupyter server's /api/status until it answers; fail with its log if it never does."""
    import time
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    proc.kill()
    with open(log_path) as f:
        pytest.fail(f"the Jupyter server at {base} did not start: {f.read()[-2000:]}")


def find_mpiexec():
    candidate = os.path.join(BIN, "mpiexec")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("mpiexec")


@pytest.fixture(scope="session")
def mpiexec():
    path = find_mpiexec()
    if path is None:
        pytest.fail("no mpiexec found: install the test extras (pip install -e '.[mpich,test]')")
    return path


class Runner:
    """Writes a script into a temp dir and runs it with mpiexec -n N (or plain python for n=0)."""

    def __init__(self, mpiexec, workdir):
        self.mpiexec = mpiexec
        self.workdir = workdir

    def write(self, name, source):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))
        return path

    def command(self, script, n, *args):
        base = [sys.executable, "-u", script, *map(str, args)]
        return base if n == 0 else [self.mpiexec, "-n", str(n), *base]

    def run(self, script, n=4, *args, timeout=180, check=True, env=None):
        """Run to the end; ``env``: variables added to this process's environment."""
        proc = subprocess.run(self.command(script, n, *args), cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout, env=self._env(env))
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def start(self, script, n=4, *args, env=None):
        """Start without waiting, in a session of its own, so a test can kill the whole MPI job."""
        return subprocess.Popen(self.command(script, n, *args), cwd=self.workdir, start_new_session=True,
                                env=self._env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def _env(extra):
        return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {}))

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def executions(self, name="exec.log"):
        """Job indices in the order they ran, from the side-effect file the job scripts append to."""
        try:
            with open(self.path(name)) as f:
                return [int(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


def seed_load(path):
    """The seed's own load(): the output file holds a pickled 1-tuple whose element is the list of triples."""
    with open(path, "rb") as f:
        data = pickle.load(f)
    return data if len(data) > 1 else data[0]


def pid_alive(pid):
    """A process that exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")


def wait_lock_holder_gone(run_dir, timeout=15):
    """mpiexec dies at once, its ranks a moment later: until rank 0, the holder named in lock.json (the on-disk
    format of docs/design.md), is gone, the lock rightly refuses a rerun."""
    try:
        with open(os.path.join(run_dir, "lock.json")) as f:
            pid = json.load(f)["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return
    deadline = time.time() + timeout
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), f"rank 0 (pid {pid}) outlived the kill"


@pytest.fixture
def runner(mpiexec, tmp_path):
    return Runner(mpiexec, str(tmp_path))


# A job script most tests share: logs each execution, so tests can count what ran again.
COUNTING_JOB = """
    import os, sys, time
    from mpitasker_ext import Tasker
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    SHIFT = int(os.environ.get('SHIFT', '0'))
    DELAY = float(os.environ.get('DELAY', '0'))
    def work(x):
        if DELAY:
            time.sleep(DELAY)
        fd = os.open('exec.log', os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f'{x if isinstance(x, int) else x[0]}\\n'.encode())
        os.close(fd)
        return x * 10 if isinstance(x, int) else ('changed', x)
    args = list(range(N))
    if SHIFT:
        args[SHIFT] = (SHIFT, 'new')
    with Tasker() as tsk:
        data = tsk.map('out.pkl', work, args)
    print('RESULT', tsk.rank, len(data), data[-1], flush=True)
"""


@pytest.fixture(scope="session")
def mpi_cluster():
    """One real ipcluster of MPI engines for the whole session (profile 'mpitest'); yields a client."""
    import ipyparallel as ipp
    ipcluster = os.path.join(BIN, "ipcluster")
    subprocess.run([ipcluster, "start", "--engines=MPI", f"-n={CLUSTER_ENGINES}", "--daemonize",
                    f"--profile={CLUSTER_PROFILE}"], check=True, capture_output=True, timeout=120)
    try:
        client = ipp.Client(profile=CLUSTER_PROFILE, timeout=60)
        client.wait_for_engines(CLUSTER_ENGINES, timeout=120)
        yield client
        client.close()
    finally:
        subprocess.run([ipcluster, "stop", f"--profile={CLUSTER_PROFILE}"], capture_output=True, timeout=120)


def unloadable_payload():
    """A stored result (format 3 payload, no out-of-band buffers) whose class no longer exists."""
    import struct
    data = b"\x80\x05cno_such_module_anymore\nThing\n."
    return struct.pack("<IQ", 0, len(data)) + data


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """The in-process IPython shell with the extension loaded, in a fresh directory; names a test defines in it
    are removed afterwards."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mpitasker_ext")
    monkeypatch.chdir(tmp_path)
    before = set(ip.user_ns)
    yield ip
    for name in set(ip.user_ns) - before:
        del ip.user_ns[name]
