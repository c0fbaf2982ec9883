"""One table from one run: no-op jobs/s (ours with the cache on, mpi4py.futures.MPICommExecutor chunksize=1,
the blog post's Tasker when ../shared/reference is present), idle-rank CPU while one rank computes, and the
speedup of CPU-bound jobs. Each figure is the median of several alternated runs.

    .venv/bin/python benchmarks/throughput.py [--repeat 3] [--jobs 20000]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SEED = os.path.join(os.path.dirname(REPO), "shared", "reference", "seed_tasker")

OURS = """
    import sys, time
    from mpi4py import MPI
    from mpitasker_ext import Tasker
    N = int(sys.argv[1])
    def noop(x):
        return x
    with Tasker() as tsk:
        MPI.COMM_WORLD.Barrier()
        t = time.perf_counter()
        tsk.map('ours.pkl', noop, range(N))
        dt = time.perf_counter() - t
    if tsk.rank == 0:
        print('RATE', N / dt)
"""

EXECUTOR = """
    import sys, time
    from mpi4py import MPI
    from mpi4py.futures import MPICommExecutor
    N = int(sys.argv[1])
    def noop(x):
        return x
    with MPICommExecutor(MPI.COMM_WORLD, 0) as ex:
        if ex is not None:
            t = time.perf_counter()
            list(ex.map(noop, range(N), chunksize=1))
            print('RATE', N / (time.perf_counter() - t))
"""

SEED_JOB = """
    import sys, time
    from mpi4py import MPI
    from mp import Tasker
    N = int(sys.argv[1])
    with Tasker() as tsk:
        MPI.COMM_WORLD.Barrier()
        t = time.perf_counter()
        tsk.map('seed.pkl', lambda x: x, range(N))
        if tsk.rank == 0:
            print('RATE', N / (time.perf_counter() - t), file=sys.stderr)
"""

IDLE = """
    import resource, time
    from mpi4py import MPI
    from mpitasker_ext import Tasker
    def job(x):
        if x == 0:
            time.sleep(3)
        return x
    with Tasker() as tsk:
        MPI.COMM_WORLD.Barrier()
        c0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        tsk.map('idle.pkl', job, range(3))
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.perf_counter() - t0
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    shares = MPI.COMM_WORLD.gather(cpu / wall, root=0)
    if tsk.rank == 0:
        print('IDLE', *shares)
"""

BURN = """
    import sys, time
    from mpitasker_ext import Tasker
    def burn(x):
        t = time.process_time()
        while time.process_time() - t < 0.25:
            pass
        return x
    t = time.perf_counter()
    with Tasker() as tsk:
        tsk.map('burn.pkl', burn, range(40))
    if tsk.rank == 0:
        print('WALL', time.perf_counter() - t)
"""


def mpiexec():
    candidate = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("mpiexec")


def run(source, n, *args, cwd=None, marker="RATE"):
    """Run a script in a fresh directory; return the numbers on its marker line."""
    workdir = tempfile.mkdtemp(prefix="mpitasker-bench-")
    try:
        if cwd:
            for name in os.listdir(cwd):
                if name.endswith(".py"):
                    shutil.copy(os.path.join(cwd, name), workdir)
        script = os.path.join(workdir, "bench_script.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(source))
        cmd = [sys.executable, "-u", script, *map(str, args)]
        if n:
            cmd = [mpiexec(), "-n", str(n), *cmd]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith(marker + " "):
                return [float(v) for v in line.split()[1:]]
        raise RuntimeError(f"{marker} missing from {cmd}: {proc.stderr[-2000:]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _process_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kernel_cpu_share(cluster_id, jobs):
    """CPU of a real Jupyter kernel (widget on) while %%mpimap follows a run of many short jobs."""
    from jupyter_client.manager import start_new_kernel

    workdir = tempfile.mkdtemp(prefix="mpitasker-bench-kernel-")
    km, kc = start_new_kernel(kernel_name="python3", cwd=workdir)
    try:
        kc.execute_interactive("%load_ext mpitasker_ext", timeout=60)
        pid = km.provisioner.process.pid
        before, t = _process_cpu(pid), time.perf_counter()
        reply = kc.execute_interactive(
            f"%%mpimap --cluster-id {cluster_id} -o r many.pkl for x in range({jobs})\n"
            "import time\ntime.sleep(0.0003)\nx", timeout=600, output_hook=lambda msg: None)
        wall, cpu = time.perf_counter() - t, _process_cpu(pid) - before
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the kernel run failed: {reply['content']}")
        return cpu / wall, wall
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        shutil.rmtree(workdir, ignore_errors=True)


def notebook_figures(repeat, jobs, ipp_jobs, progress_jobs):
    """%%mpimap on a warm 4-engine MPI cluster, against ipyparallel's own load-balanced map on the same engines."""
    import ipyparallel as ipp
    from IPython.core.interactiveshell import InteractiveShell

    cluster = ipp.Cluster(engines="mpi", n=4, log_level=40)
    cluster.config.MPILauncher.mpi_cmd = [mpiexec()]
    cluster.start_cluster_sync()
    workdir = tempfile.mkdtemp(prefix="mpitasker-bench-nb-")
    try:
        client = cluster.connect_client_sync()
        client.wait_for_engines(4, timeout=120)
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "mpitasker_ext")
        magics = shell.magics_manager.registry["MPIMapMagics"]
        magics._client, magics._client_key = client, (None, None)
        os.chdir(workdir)
        import contextlib
        import io

        def timed_magic(n, name):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                shell.run_cell_magic("mpimap", f"--force {name}.pkl for x in range({n})", "x")
            return time.perf_counter() - t

        timed_magic(10, "warmup")
        overhead = [timed_magic(100, f"small{i}") for i in range(max(repeat, 5))]
        rates = [jobs / timed_magic(jobs, f"big{i}") for i in range(repeat)]
        view = client.load_balanced_view()
        view.map_sync(abs, range(50))
        ipp_rates = []
        for _ in range(repeat):
            t = time.perf_counter()
            view.map_sync(abs, range(ipp_jobs))
            ipp_rates.append(ipp_jobs / (time.perf_counter() - t))

        def barrier():
            from mpi4py import MPI
            MPI.COMM_WORLD.Barrier()
        client[:].apply_sync(barrier)
        trips = []
        for _ in range(10):
            t = time.perf_counter()
            client[:].apply_sync(barrier)
            trips.append(time.perf_counter() - t)
        kernel_cpu = kernel_cpu_share(cluster.cluster_id, progress_jobs)
        return statistics.median(overhead), statistics.median(rates), statistics.median(ipp_rates), \
            statistics.median(trips), kernel_cpu
    finally:
        os.chdir(REPO)
        cluster.stop_cluster_sync()
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--seed-jobs", type=int, default=2000, help="jobs for the blog post's Tasker (slow)")
    parser.add_argument("--ipp-jobs", type=int, default=2000, help="jobs for ipyparallel's map (slow)")
    parser.add_argument("--no-notebook", action="store_true", help="skip the %%%%mpimap / ipyparallel rows")
    parser.add_argument("--progress-jobs", type=int, default=100000, help="jobs for the kernel CPU row")
    opts = parser.parse_args()
    ours, executor, seed, idle, speedups = [], [], [], [], []
    for _ in range(opts.repeat):
        ours.append(run(OURS, 4, opts.jobs)[0])
        executor.append(run(EXECUTOR, 4, opts.jobs)[0])
        if os.path.isdir(SEED):
            seed.append(run(SEED_JOB, 4, opts.seed_jobs, cwd=SEED)[0])
        idle.append(max(run(IDLE, 4, marker="IDLE")))
        serial = run(BURN, 0, marker="WALL")[0]
        parallel = run(BURN, 3, marker="WALL")[0]
        speedups.append(serial / parallel)
    med = statistics.median
    ratio = med(a / b for a, b in zip(ours, executor, strict=True))
    rows = [
        ("no-op jobs/s, mpitasker_ext (cache on), -n 4", f"{med(ours):,.0f}", f"{ratio:.1f}x executor", ">= 10x"),
        ("no-op jobs/s, MPICommExecutor chunksize=1, -n 4", f"{med(executor):,.0f}", "1.0x", ""),
    ]
    if seed:
        rows.append(("no-op jobs/s, blog post's Tasker, -n 4", f"{med(seed):,.0f}",
                     f"{med(seed) / med(executor):.2f}x executor", ""))
    rows += [
        ("busiest idle rank while one job sleeps 3 s, -n 4", f"{med(idle) * 100:.2f}% of a core", "", "<= 2%"),
        ("speedup, 40 x 0.25 s CPU jobs, -n 3 vs serial", f"{med(speedups):.2f}x", "2 workers, 2 cores",
         ">= 1.85x"),
    ]
    if not opts.no_notebook:
        overhead, magic_rate, ipp_rate, trip, (kernel_cpu, kernel_wall) = notebook_figures(
            opts.repeat, opts.jobs, opts.ipp_jobs, opts.progress_jobs)
        rows += [
            ("%%mpimap overhead, 100 no-op jobs, warm 4 engines", f"{overhead * 1000:.0f} ms",
             f"apply+barrier {trip * 1000:.0f} ms", "<= 300 ms"),
            (f"no-op jobs/s, %%mpimap ({opts.jobs} jobs), 4 engines", f"{magic_rate:,.0f}",
             f"{magic_rate / ipp_rate:.0f}x ipyparallel", ""),
            (f"no-op jobs/s, ipyparallel load-balanced map ({opts.ipp_jobs})", f"{ipp_rate:,.0f}", "1.0x", ""),
            (f"kernel CPU, widget following {opts.progress_jobs} jobs", f"{kernel_cpu * 100:.1f}% of a core",
             f"over {kernel_wall:.0f} s", "<= 5%"),
        ]
    print(f"median of {opts.repeat} alternated runs, {opts.jobs} no-op jobs "
          f"({opts.seed_jobs} for the blog post's Tasker), {os.cpu_count()} cores")
    widths = [max(len(r[i]) for r in rows + [("measure", "value", "ratio", "goal")]) for i in range(4)]
    header = ("measure", "value", "ratio", "goal")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
