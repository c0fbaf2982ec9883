"""A real single-node Slurm (Debian's slurm-wlm + munge) brought up in a private directory, without systemd.

Used by the Slurm tests; `.ci/test` installs the packages. Every Slurm command goes through ``run`` with a
timeout: a request the node cannot satisfy would otherwise wait forever.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

CPUS = 8


class Slurm:
    def __init__(self, root):
        self.root = str(root)
        self.host = socket.gethostname()
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs = []
        # Job ids restart with every new Slurm; MPICH names its shared memory after the PMI-2 job name
        # ("<job>.<step>"), and a segment left by a killed job of an earlier instance with the same id makes
        # MPI_Init wait on it forever. A fresh random range keeps instances apart, as a real cluster's
        # ever-growing ids do.
        self.first_job_id = int.from_bytes(os.urandom(3), "big") * 3 + 1000   # below MaxJobId (67,043,328)

    def start(self):
        for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing: install Debian's slurm-wlm and munge (.ci/test does)")
        munge = os.path.join(self.root, "munge")
        os.makedirs(os.path.join(munge, "key"), mode=0o700)
        os.makedirs(os.path.join(munge, "run"), mode=0o755)
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub))
        key = os.path.join(munge, "key", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = os.path.join(munge, "run", "munge.socket")
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={self.socket}",
                        f"--pid-file={munge}/run/munged.pid", f"--log-file={munge}/munged.log",
                        f"--seed-file={munge}/munged.seed"], check=True, timeout=30, capture_output=True)
        with open(f"{munge}/run/munged.pid") as f:
            self.munged_pid = int(f.read())
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            log = open(os.path.join(self.root, "log", f"{daemon}.out"), "w")
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", self.conf], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.3)
        raise RuntimeError("Slurm did not come up: " + self.logs())

    def _write_conf(self):
        r = self.root
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=mpitasker
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=5
MinJobAge=300
FirstJobId={self.first_job_id}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def run(self, cmd, timeout=60, check=True, **kwargs):
        return subprocess.run(cmd, env=dict(self.env, **kwargs.pop("env", {})), capture_output=True, text=True,
                              timeout=timeout, check=check, **kwargs)

    def sbatch(self, script, *options, cwd=None, env=None):
        out = self.run(["sbatch", "--parsable", *options, script], cwd=cwd, env=env or {}).stdout.strip()
        return out.split(";")[0]

    def state(self, job):
        out = self.run(["scontrol", "show", "job", job], check=False).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job, states=("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout} s")

    def logs(self):
        text = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path) as f:
                    text.append(f"--- {name}\n" + f.read()[-3000:])
        return "\n".join(text)

    def stop(self):
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            os.kill(self.munged_pid, signal.SIGTERM)
        except (ProcessLookupError, AttributeError):
            pass
