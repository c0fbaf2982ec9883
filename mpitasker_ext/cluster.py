"""Find, start or stop an ipyparallel cluster whose engines form one MPI world, keep the kernel's session with it
(``ClusterSession``), and run a sweep on it.

The kernel never imports ``mpi4py.MPI`` (MPI inside a Jupyter kernel hangs or kills it); it talks to the engines
through ipyparallel only. The job travels once, as one payload, to every engine; from then on MPI carries only
job indices between the engines. Rank 0 of the engines runs the scheduler, the others the worker loop.
"""

import logging
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field

from . import mpi_impl
from .errors import ClusterError, EnginesDied, MPITaskerError, UsageError
from .sweep import Outcome

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
START_TIMEOUT = 120.0
HOW_TO_START = ("start one with  %mpicluster start -n 4  in the notebook, or  ipcluster start --engines=MPI -n 4  "
                "in a terminal")


def mpiexec_path():
    """The mpiexec of this environment (the 'mpich' wheel puts it in bin/), even when bin/ is not on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("mpiexec")
    if found is None:
        raise ClusterError("no mpiexec found next to this Python or on PATH: install an MPI "
                           "(pip install 'mpitasker_ext[mpich]') or put your site's mpiexec on PATH")
    return found


def _import_ipyparallel():
    try:
        import ipyparallel
    except ImportError as exc:
        raise ClusterError(f"ipyparallel is not installed ({exc}): pip install mpitasker_ext brings it") from exc
    return ipyparallel


def connection_file(profile=None, cluster_id=None):
    """Where ipcontroller writes the client's connection file for this profile and cluster id."""
    from IPython.core.profiledir import ProfileDir, ProfileDirError
    from IPython.paths import get_ipython_dir

    try:
        profile_dir = ProfileDir.find_profile_dir_by_name(get_ipython_dir(), profile or "default")
    except ProfileDirError:
        return None
    name = f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json"
    return os.path.join(profile_dir.security_dir, name)


def connect(profile=None, cluster_id=None):
    """A client of a running cluster, or None when that profile has no cluster running."""
    path = connection_file(profile, cluster_id)
    if path is None or not os.path.exists(path):
        return None
    ipp = _import_ipyparallel()
    try:
        client = ipp.Client(path, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"the cluster described by {path} does not answer ({exc}); it probably died. "
                           f"Remove that file or {HOW_TO_START}.") from exc
    if not client.ids:
        client.close()
        raise ClusterError(f"the cluster of {path} has no engines; start them with "
                           "ipcluster engines --engines=MPI -n 4, or stop it and " + HOW_TO_START)
    return client


ENGINE_LAUNCHERS = ("mpi", "slurm")


def start(n=4, profile=None, cluster_id=None, engines="mpi"):
    """Start a controller and n engines (under this environment's mpiexec, or as a Slurm job whose srun makes
    them one MPI world); return (cluster, client)."""
    if not isinstance(n, int) or n < 2:
        raise UsageError(f"-n {n}: an MPI cluster needs at least 2 engines (rank 0 schedules, the others compute)")
    if engines not in ENGINE_LAUNCHERS:
        raise UsageError(f"--engines {engines!r}: use one of {', '.join(ENGINE_LAUNCHERS)}")
    ipp = _import_ipyparallel()
    kwargs = {"engines": engines, "n": n, "log_level": logging.WARNING}
    if profile:
        kwargs["profile"] = profile
    if cluster_id:
        kwargs["cluster_id"] = cluster_id
    if engines == "slurm":
        if shutil.which("sbatch") is None:
            raise ClusterError("--engines slurm needs Slurm's sbatch on PATH (run this on a login node of the "
                               "cluster)")
        kwargs["controller_ip"] = "*"                      # engines on compute nodes must reach the controller
        kwargs["controller_location"] = socket.gethostname()
    cluster = ipp.Cluster(**kwargs)
    mpi = mpi_impl.configure_engines(cluster, mpiexec_path())
    cluster.start_cluster_sync()
    try:
        client = cluster.connect_client_sync()
        mpi_impl.wait_for_engines(cluster, client, n, mpi, timeout=START_TIMEOUT)
    except BaseException:
        stop(cluster)
        raise
    return cluster, client


def stop(cluster=None, profile=None, cluster_id=None):
    """Stop the cluster given, else the one the profile's cluster file describes; its id, or None when no
    cluster runs there."""
    if cluster is None:
        ipp = _import_ipyparallel()
        try:
            cluster = ipp.Cluster.from_file(profile=profile, cluster_id=cluster_id or "")
        except FileNotFoundError:
            return None
    quiet = _BelowError()
    cluster.log.addFilter(quiet)
    try:
        cluster.stop_cluster_sync()
    finally:
        cluster.log.removeFilter(quiet)
    return cluster.cluster_id


class _BelowError(logging.Filter):
    """Stopping kills mpiexec, which exits with code 1: ipyparallel then logs the engines' whole output and
    'engine set stopped ... exit_code 1' as warnings, which read like a failure of the stop the user asked for."""

    def filter(self, record):
        return record.levelno >= logging.ERROR


class ClusterSession:
    """The cluster a kernel works with: at most one it started itself, and a client to the one in use, whose
    engines are checked to be one MPI world once per set of engines (a restart or an added engine checks again)."""

    def __init__(self):
        self._cluster = None  # the ipyparallel Cluster this session started
        self.client = None
        self._asked_for = None  # (profile, cluster_id) of the client
        self._checked_ids = None
        self._ranks = {}
        self._client_is_own = False  # the client is of the cluster this session started

    def connect(self, profile=None, cluster_id=None):
        """The client in use, or one of the cluster named (the default profile's when none is named); None when
        no cluster runs and none was named."""
        asked_for = (profile, cluster_id)
        if self.client is not None and asked_for in ((None, None), self._asked_for):
            return self.client
        client = connect(profile, cluster_id)
        if client is None:
            if asked_for == (None, None):
                return None
            raise ClusterError(f"no cluster is running for profile {profile or 'default'!r}"
                               + (f" with id {cluster_id!r}" if cluster_id else "") + f"; {HOW_TO_START}")
        self._use(client, asked_for)
        return client

    def world(self):
        """Engine id -> MPI rank of the engines in use, when they are one MPI world."""
        ids = tuple(self.client.ids)
        if not ids:
            raise ClusterError("the cluster has no engines left (they died or were stopped); restart it: "
                               "%mpicluster stop then %mpicluster start -n N, or ipcluster stop / start")
        if self._checked_ids != ids:
            self._ranks = check_one_world(self.client)
            self._checked_ids = ids
        return self._ranks

    def start(self, n=4, profile=None, cluster_id=None, engines="mpi"):
        """Start a controller and n MPI engines and use them; returns (the cluster's id, engine id -> rank)."""
        if self._cluster is not None:
            raise UsageError("this kernel already started a cluster; use it, or %mpicluster stop first")
        if cluster_id:
            existing = connect(profile, cluster_id)
            if existing is not None:
                existing.close()
                raise UsageError(f"a cluster with id {cluster_id!r} is already running; use it "
                                 f"(--cluster-id {cluster_id}), or stop it first")
        cluster, client = start(n, profile, cluster_id, engines)
        try:
            ranks = check_one_world(client)
        except ClusterError as exc:
            client.close()
            stop(cluster)
            raise ClusterError(f"{exc} The engines were stopped.") from None
        self._cluster = cluster
        self._use(client, (profile, cluster_id))
        self._client_is_own = True
        self._ranks, self._checked_ids = ranks, tuple(client.ids)
        return cluster.cluster_id, ranks

    @property
    def started(self):
        """True while a cluster this session started runs."""
        return self._cluster is not None

    def stop(self, profile=None, cluster_id=None):
        """Stop the cluster named, else the one this session started (else the default profile's); its id, or
        None when none runs there. A cluster named that is not this session's own leaves its own running."""
        own = self._cluster
        if (own is not None and profile in (None, own.profile or "default")    # ipyparallel's '' is the default
                and cluster_id in (None, own.cluster_id)):
            self._use(None, None)
            stopped = stop(own)
            self._cluster = None        # only once stopped: after a failure, %mpicluster stop can try again
            return stopped
        if not (own is not None and self._client_is_own):
            self._use(None, None)       # it may be the named cluster's; the next run connects again
        return stop(None, profile, cluster_id)

    def submit(self, task):
        """Send the task to every engine in use; ipyparallel's AsyncResult (a Future)."""
        return submit(self.client, task)

    def interrupt(self, future, grace=10):
        """Ctrl-C for the engines: they stop their jobs and keep every finished record."""
        import signal

        self.client.send_signal(signal.SIGINT, targets=list(self.client.ids), block=True)
        future.wait(grace)

    def _use(self, client, asked_for):
        if self.client is not None and self.client is not client:
            self.client.close()
        self.client, self._asked_for, self._checked_ids = client, asked_for, None
        self._client_is_own = False


def _engine_world():
    """Runs on an engine: its place in MPI.COMM_WORLD."""
    import os
    import socket

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return {"rank": world.Get_rank(), "size": world.Get_size(), "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_mpi": os.environ.get("SLURM_MPI_TYPE")}


def check_one_world(client):
    """Engine id -> MPI rank, if the engines are exactly one MPI world; a clear error otherwise."""
    view = client[:]
    infos = view.apply_sync(_engine_world)
    ids = list(view.targets) if isinstance(view.targets, list) else list(client.ids)
    ranks = {engine: info["rank"] for engine, info in zip(ids, infos, strict=True)}
    sizes = {info["size"] for info in infos}
    if sizes != {len(infos)} or sorted(ranks.values()) != list(range(len(infos))):
        detail = ", ".join(f"engine {e}: rank {i['rank']} of {i['size']}" for e, i in zip(ids, infos, strict=True))
        raise ClusterError(
            f"the {len(infos)} engines are not one MPI world ({detail}). Start them together under MPI: "
            "ipcluster start --engines=MPI -n N (or %mpicluster start -n N); engines started one by one, or "
            "by a launcher without MPI, each see a world of their own." + _slurm_hint(infos))
    if len(infos) < 2:
        raise ClusterError("the cluster has a single engine: MPI needs rank 0 to schedule and at least one "
                           "worker; " + HOW_TO_START)
    return ranks


def _slurm_hint(infos):
    jobs = {i.get("slurm_job") for i in infos} - {None}
    if not jobs:
        return ""
    plugin = {i.get("slurm_mpi") for i in infos} - {None}
    return (f" These engines run in Slurm job {', '.join(sorted(jobs))}"
            + (f" with the MPI plugin {', '.join(sorted(plugin))!r}" if plugin else "")
            + ", whose srun did not connect them: start them with SLURM_MPI_TYPE=pmi2 in the environment (or "
            "srun --mpi=pmi2), or have the administrators set MpiDefault=pmi2 in slurm.conf.")


@dataclass
class EngineTask:
    """What every engine receives: the cell job, the arguments, and the kernel's view of the world."""

    job: object
    args: list
    output: str
    cwd: str
    sys_path: list
    options: dict = field(default_factory=dict)


def run_task(payload, token=0):
    """Runs on every engine: rebuild the job, step into the kernel's directory and path, take part in the run;
    answer with this engine's MPI rank and the run's ``Outcome`` (small: the results stay in the store, which the
    kernel reads itself, so they never travel back through the engines and ZMQ).

    Whatever fails while setting up (unpickling, a module missing here, the directory) is handed to the run, so
    every engine learns of it together instead of the others waiting for this one.
    """
    import pickle

    import cloudpickle
    from mpi4py import MPI

    from .scheduler import run_mpi
    from .sweep import Sweep

    rank = MPI.COMM_WORLD.Get_rank()
    old_cwd, old_path = os.getcwd(), list(sys.path)
    sweep, setup_error = None, None
    try:
        task = pickle.loads(payload)
        try:
            os.chdir(task.cwd)
        except OSError as exc:
            raise ClusterError(f"engine rank {rank} on {socket.gethostname()} cannot enter the notebook's "
                               f"directory {task.cwd} ({exc.strerror}): run the engines where it exists") from exc
        sys.path[:0] = [p for p in task.sys_path if p not in sys.path]
        sweep = Sweep(task.job.function(), task.args, task.output, fingerprint=task.job.fingerprint,
                      function_name="%%mpimap cell", echo_output=False, **task.options)
    except Exception as exc:  # noqa: BLE001 - any setup failure must reach every rank, see run_mpi
        setup_error = exc
    try:
        run_mpi(sweep, MPI.COMM_WORLD, setup_error=setup_error, token=token)
    except MPITaskerError as exc:
        outcome = Outcome.from_exception(exc)
    else:
        outcome = Outcome(ok=True, total=len(sweep.args))
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
    return cloudpickle.dumps((rank, outcome))


def submit(client, task):
    """Send the task to every engine at once; return ipyparallel's AsyncResult (a Future)."""
    import secrets

    import cloudpickle

    payload = cloudpickle.dumps(task)
    return client[:].apply_async(run_task, payload, secrets.randbits(62))


def collect(future, output):
    """Rank 0's ``Outcome``, or a clear EnginesDied when engine processes died during the run."""
    try:
        replies = future.result()
    except Exception as exc:  # noqa: BLE001 - ipyparallel wraps remote failures in several types
        dead = _dead_engines(exc)
        if not dead:
            raise
        raise EnginesDied(_death_message(dead, output)) from None
    return _root_outcome(replies)


def _dead_engines(exc):
    """Engine ids that ipyparallel reports as died (EngineError), from a single or a composite error."""
    errors = getattr(exc, "elist", None)
    if errors is None:
        errors = [(type(exc).__name__, str(exc), "", getattr(exc, "engine_info", {}) or {})]
    dead = set()
    for name, value, _tb, info in errors:
        if name == "EngineError":
            found = re.search(r"Engine (\d+) died", str(value))
            dead.add(int(found.group(1)) if found else (info or {}).get("engine_id", "?"))
    return sorted(dead, key=str)


def _death_message(dead, output):
    from .progress import read_progress
    from .rundir import RunDir

    running = ", ".join(f"job {index} (rank {info.rank}, pid {info.pid})"
                        for index, info in RunDir(output).interrupted_jobs()[-8:])
    snapshot = read_progress(output)
    return (f"MPI engines died during the run (engines {', '.join(map(str, dead))}; MPI stops every engine "
            "when one of its processes dies). "
            + (f"Jobs running at that moment: {running}; if one of them kills its process (os._exit, a "
               "segfault, running out of memory), it is the cause. " if running else "")
            + f"{snapshot.done} finished jobs are kept in {output}.mpi/. Restart the cluster (%mpicluster stop "
            "then %mpicluster start -n N, or ipcluster stop / start in the terminal) and run the cell again to "
            "resume.")


def _root_outcome(replies):
    """Rank 0's ``Outcome``: success, or the error every rank agreed on."""
    import pickle

    for data in replies:
        rank, outcome = pickle.loads(data)
        if rank == 0:
            return outcome
    raise ClusterError("no engine reported as MPI rank 0")
