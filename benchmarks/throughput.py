"""One table from one run: no-op jobs/s (ours with the cache on, mpi4py.futures.MPICommExecutor chunksize=1,
the blog post's Tasker when ../shared/reference is present), idle-rank CPU while one rank computes, the speedup
of CPU-bound jobs, %%mpimap against ipyparallel on the same engines, 2 MB array results (time and peak memory
per rank, script and notebook), jobs rerun after grid changes, and rank 0's memory over a million jobs. Each
figure is the median of several alternated runs.

    .venv/bin/python benchmarks/throughput.py [--repeat 3] [--jobs 20000] [--only big,grid] [--skip million]

Sections (all by default, in this order): noop, big, grid, million, notebook, notebook-big.
"""

import argparse
import contextlib
import io
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


BIG = """
    import resource, sys, time
    import numpy as np
    from mpi4py import MPI
    N = int(sys.argv[2])
    def f(i):
        return np.full(250_000, float(i))
    comm = MPI.COMM_WORLD
    t0 = time.perf_counter()
    if sys.argv[1] == 'ours':
        from mpitasker_ext import Tasker
        with Tasker(progress=False) as t:
            r = t.map('big.pkl', f, range(N))
        if comm.rank == 0:
            ok = len(r) == N and float(r[N // 3][2][3]) == N // 3
    else:
        from mpi4py.futures import MPICommExecutor
        with MPICommExecutor(comm, 0) as ex:
            if ex is not None:
                r = list(ex.map(f, range(N), chunksize=1))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if sys.argv[1] == 'ours':
        if comm.rank == 0:
            import os
            import mpitasker_ext
            ok = ok and os.path.exists('big.pkl') and all(
                i == k and list(a) == [k] and v.shape == (250_000,) and float(v[3]) == k
                for k, (i, a, v) in enumerate(r))
            if hasattr(mpitasker_ext, 'load'):
                record = mpitasker_ext.load('big.pkl')[N // 3]
                value = record[2] if isinstance(record, (tuple, list)) and len(record) == 3 else record
                ok = ok and float(value[3]) == N // 3
        else:
            ok = len(r) == N and r[N // 3][0] == N // 3 and float(r[N // 3][2][3]) == N // 3
    else:
        ok = comm.rank != 0 or (len(r) == N and all(float(v[3]) == k for k, v in enumerate(r)))
    ok = comm.allreduce(int(bool(ok)), op=MPI.MIN)
    peaks = comm.gather(peak, root=0)
    if comm.rank == 0:
        print('BIG', dt, ok, *peaks)
"""

GRID = """
    import os, sys
    from mpitasker_ext import Tasker
    def f(x):
        fd = os.open('exec.log', os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f'{x}\\n'.encode())
        os.close(fd)
        return x * x
    grid = eval(sys.argv[1])
    with Tasker(progress=False) as t:
        data = t.map('grid.pkl', f, grid)
    ok = [r for (_, _, r) in data] == [x * x for x in grid] and [list(a) for (_, a, _) in data] == [[x] for x in grid]
    if t.rank == 0:
        print('GRID', int(ok), len(grid))
"""

GRID_STEPS = [
    ("base range(1, 101)", "list(range(1, 101))", 100),
    ("extend to range(1, 111)", "list(range(1, 111))", 10),
    ("reverse", "list(range(1, 111))[::-1]", 0),
    ("odd subset range(1, 111, 2)", "list(range(1, 111, 2))", 0),
    ("insert [0] at the front", "[0] + list(range(1, 111))", 1),
    ("coarse 0, 1, ..., 20", "[x * 0.5 for x in range(0, 41, 2)]", 21),
    ("refined 0, 0.5, ..., 20", "[x * 0.5 for x in range(0, 41)]", 20),
]

MILLION = """
    import os, resource, sys, threading, time
    from mpi4py import MPI
    from mpitasker_ext import mpimap
    N = int(sys.argv[1])
    world = MPI.COMM_WORLD
    most_files = [0]
    def count_files():
        while not done.is_set():
            try:
                most_files[0] = max(most_files[0], len(os.listdir('million.pkl.mpi')))
            except FileNotFoundError:
                pass
            time.sleep(0.05)
    done = threading.Event()
    if world.rank == 0:
        threading.Thread(target=count_files, daemon=True).start()
    world.Barrier()
    t = time.perf_counter()
    values = mpimap(lambda x: x, range(N), 'million.pkl', progress=False)
    wall = time.perf_counter() - t
    done.set()
    if world.rank == 0:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ok = len(values) == N and all(values[i] == i for i in (0, N // 2, N - 1))
        print('MILLION', N / wall, wall, rss, most_files[0], int(ok))
"""


def mpiexec():
    candidate = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("mpiexec")


def run(source, n, *args, cwd=None, marker="RATE", workdir=None, strict=False):
    """Run a script in a fresh directory (or in workdir, kept); return the numbers on its marker line.

    strict: a non-zero exit fails the run even when the marker was printed.
    """
    fresh = workdir is None
    if fresh:
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
        if strict and proc.returncode != 0:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}: {proc.stderr[-2000:]}")
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith(marker + " "):
                return [float(v) for v in line.split()[1:]]
        raise RuntimeError(f"{marker} missing from {cmd}: {proc.stderr[-2000:]}")
    finally:
        if fresh:
            shutil.rmtree(workdir, ignore_errors=True)


def _median_per_rank(runs):
    return [statistics.median(column) for column in zip(*runs, strict=True)]


def big_rows(repeat, jobs):
    """Array results through the script path: ours (cache on, output on disk) against MPICommExecutor."""
    ours, executor = [], []
    for _ in range(repeat):
        for who, into in (("ours", ours), ("executor", executor)):
            dt, ok, *peaks = run(BIG, 4, who, jobs, marker="BIG", strict=True)
            if not ok:
                raise RuntimeError(f"{who}: wrong results for {jobs} array jobs")
            into.append((dt, peaks))
    med = statistics.median
    time_ratio = med(o[0] / e[0] for o, e in zip(ours, executor, strict=True))
    rank0_ratio = med(o[1][0] / e[1][0] for o, e in zip(ours, executor, strict=True))
    ours_peaks, exe_peaks = _median_per_rank([o[1] for o in ours]), _median_per_rank([e[1] for e in executor])
    mb = jobs * 2
    return [
        (f"{jobs} x 2 MB results ({mb} MB), -n 4: wall, ours (cache on)", f"{med(o[0] for o in ours):.1f} s",
         f"{time_ratio:.2f}x executor", "<= 0.5x"),
        (f"{jobs} x 2 MB results, -n 4: wall, MPICommExecutor", f"{med(e[0] for e in executor):.1f} s", "1.0x", ""),
        (f"{jobs} x 2 MB results: rank 0 peak RSS, ours", f"{ours_peaks[0]:,.0f} MiB",
         f"{rank0_ratio:.2f}x executor rank 0", "<= 1.3x"),
        (f"{jobs} x 2 MB results: rank 0 peak RSS, executor", f"{exe_peaks[0]:,.0f} MiB", "1.0x", ""),
        (f"{jobs} x 2 MB results: max other-rank peak, ours", f"{max(ours_peaks[1:]):,.0f} MiB",
         "ranks 1-3: " + "/".join(f"{p:.0f}" for p in ours_peaks[1:]), "<= 200 MiB"),
        (f"{jobs} x 2 MB results: max other-rank peak, executor", f"{max(exe_peaks[1:]):,.0f} MiB",
         "ranks 1-3: " + "/".join(f"{p:.0f}" for p in exe_peaks[1:]), ""),
    ]


def grid_rows():
    """Jobs run again after each grid change, in one output, counted by the job itself."""
    workdir = tempfile.mkdtemp(prefix="mpitasker-bench-grid-")
    log = os.path.join(workdir, "exec.log")
    rows = []
    try:
        for what, grid, want in GRID_STEPS:
            with contextlib.suppress(FileNotFoundError):
                os.remove(log)
            ok, size = run(GRID, 4, grid, marker="GRID", workdir=workdir, strict=True)
            if not ok:
                raise RuntimeError(f"grid step {what!r}: wrong results or arguments")
            executed = 0
            if os.path.exists(log):
                with open(log) as f:
                    executed = sum(1 for _ in f)
            rows.append((f"grid change, -n 4: {what}", f"{executed} run", f"of {size:.0f} jobs", f"{want}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def million_rows(repeat, jobs):
    """Rank 0's peak memory and the rate over a million no-op jobs."""
    runs = []
    for _ in range(repeat):
        rate, wall, rss, files, ok = run(MILLION, 4, jobs, marker="MILLION", strict=True)
        if not ok:
            raise RuntimeError(f"wrong results for {jobs:,} no-op jobs")
        runs.append((rate, wall, rss, files))
    rate, wall, rss, _ = _median_per_rank(runs)
    return [
        (f"{jobs:,} no-op jobs, -n 4: rank 0 peak RSS", f"{rss:,.0f} MiB", "", "<= 300 MiB"),
        (f"{jobs:,} no-op jobs, -n 4: jobs/s (mpimap)", f"{rate:,.0f}", f"{wall:.1f} s", ""),
    ]


def _process_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_at_start(kc):
    """The kernel's process time recorded just before the timed cell (see ``kernel_cpu_share``)."""
    seen = []
    kc.execute_interactive("print('START', _mpitasker_bench_start)", timeout=60,
                           output_hook=lambda msg: seen.append(msg["content"].get("text", "")))
    return float("".join(seen).split("START", 1)[1])


def kernel_cpu_share(cluster_id, jobs, live=False):
    """CPU of a real Jupyter kernel (widget on) while %%mpimap follows a run of many short jobs; with ``live``, a
    --live function is also given the finished part (about once a second: reading the new records, unpickling
    their values, building the lists)."""
    from jupyter_client.manager import start_new_kernel

    workdir = tempfile.mkdtemp(prefix="mpitasker-bench-kernel-")
    km, kc = start_new_kernel(kernel_name="python3", cwd=workdir)
    try:
        kc.execute_interactive("%load_ext mpitasker_ext", timeout=60)
        kc.execute_interactive("import time\ncalls = []\ndef draw(args, results):\n"
                               "    calls.append((len(results), time.process_time(), time.time()))", timeout=60)
        pid = km.provisioner.process.pid
        kc.execute_interactive("_mpitasker_bench_start = time.process_time()", timeout=60)
        before, t, t_wall = _process_cpu(pid), time.perf_counter(), time.time()
        reply = kc.execute_interactive(
            f"%%mpimap --cluster-id {cluster_id} {'--live draw ' if live else ''}-o r many.pkl for x in range({jobs})\n"
            "import time\ntime.sleep(0.0003)\nx", timeout=600, output_hook=lambda msg: None)
        wall, cpu = time.perf_counter() - t, _process_cpu(pid) - before
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the kernel run failed: {reply['content']}")
        if not live:
            return cpu / wall, wall
        seen = []
        kc.execute_interactive("print('CALLS', (calls[-2], len(calls)))", timeout=60,   # the last call before the end
                               output_hook=lambda msg: seen.append(msg["content"].get("text", "")))
        (count, cpu_at_last, wall_at_last), ncalls = eval("".join(seen).split("CALLS", 1)[1])  # noqa: S307
        running = (cpu_at_last - cpu_at_start(kc)) / (wall_at_last - t_wall)
        return cpu / wall, wall, running, ncalls
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def engines():
    """A warm 4-engine MPI cluster, a client to it, and an in-process IPython shell with the extension loaded."""
    import ipyparallel as ipp
    from IPython.core.interactiveshell import InteractiveShell

    home, workdir = os.getcwd(), tempfile.mkdtemp(prefix="mpitasker-bench-nb-")
    os.chdir(workdir)
    cluster = ipp.Cluster(engines="mpi", n=4, log_level=40)
    cluster.config.MPILauncher.mpi_cmd = [mpiexec()]
    try:
        cluster.start_cluster_sync()
        client = cluster.connect_client_sync()
        client.wait_for_engines(4, timeout=120)
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "mpitasker_ext")
        yield cluster, client, shell
    finally:
        os.chdir(home)
        cluster.stop_cluster_sync()
        shutil.rmtree(workdir, ignore_errors=True)


def run_magic(shell, cluster, line, cell):
    """One %%mpimap cell on the benchmark's cluster, its output swallowed; a run that fell back to the kernel fails."""
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        shell.run_cell_magic("mpimap", f"--cluster-id {cluster.cluster_id} {line}", cell)
    if "serially" in said.getvalue():
        raise RuntimeError(f"%%mpimap did not reach the benchmark's cluster: {said.getvalue()[-500:]}")


def notebook_figures(engine, repeat, jobs, ipp_jobs, progress_jobs):
    """%%mpimap on a warm 4-engine MPI cluster, against ipyparallel's own load-balanced map on the same engines."""
    cluster, client, shell = engine

    def timed_magic(n, name):
        t = time.perf_counter()
        run_magic(shell, cluster, f"--force {name}.pkl for x in range({n})", "x")
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
    live_cpu = kernel_cpu_share(cluster.cluster_id, progress_jobs, live=True)
    client.purge_everything()
    return statistics.median(overhead), statistics.median(rates), statistics.median(ipp_rates), \
        statistics.median(trips), kernel_cpu, live_cpu


def _array(i):
    import numpy as np
    return np.full(250_000, float(i))


def _read_all(values, jobs, who):
    """Touch every result, so a list that reads lazily is really read, and check it."""
    if len(values) != jobs or [float(v[3]) for v in values] != [float(k) for k in range(jobs)]:
        raise RuntimeError(f"{who}: wrong results for {jobs} array jobs")


def notebook_big_figures(engine, repeat, jobs):
    """2 MB results into the notebook: %%mpimap -o NAME against ipyparallel's load-balanced map, alternated."""
    cluster, client, shell = engine
    view = client.load_balanced_view()
    cell = "import numpy as np\nnp.full(250_000, float(i))"

    def magic(name, n):
        t = time.perf_counter()
        run_magic(shell, cluster, f"-o {name} {name}.pkl for i in range({n})", cell)
        _read_all(shell.user_ns[name], n, "%%mpimap")
        dt = time.perf_counter() - t
        del shell.user_ns[name]
        return dt

    def ipyparallel(n):
        t = time.perf_counter()
        _read_all(view.map_sync(_array, range(n)), n, "ipyparallel")
        dt = time.perf_counter() - t
        client.purge_everything()
        return dt

    magic("arrays_warmup", 8)
    ipyparallel(8)
    ours, theirs = [], []
    for i in range(repeat):
        ours.append(magic(f"arrays{i}", jobs))
        theirs.append(ipyparallel(jobs))
    return statistics.median(ours), statistics.median(theirs), \
        statistics.median(o / t for o, t in zip(ours, theirs, strict=True))


SECTIONS = ("noop", "big", "grid", "million", "notebook", "notebook-big")


def sections(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}; pick from {', '.join(SECTIONS)}")
    return names


def noop_rows(opts):
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
    return rows


def notebook_rows(opts, chosen):
    rows = []
    with engines() as engine:
        if "notebook" in chosen:
            overhead, magic_rate, ipp_rate, trip, (kernel_cpu, kernel_wall), live = notebook_figures(
                engine, opts.repeat, opts.jobs, opts.ipp_jobs, opts.progress_jobs)
            live_cpu, live_wall, live_running, live_calls = live
            rows += [
                ("%%mpimap overhead, 100 no-op jobs, warm 4 engines", f"{overhead * 1000:.0f} ms",
                 f"apply+barrier {trip * 1000:.0f} ms", "<= 300 ms"),
                (f"no-op jobs/s, %%mpimap ({opts.jobs} jobs), 4 engines", f"{magic_rate:,.0f}",
                 f"{magic_rate / ipp_rate:.0f}x ipyparallel", ""),
                (f"no-op jobs/s, ipyparallel load-balanced map ({opts.ipp_jobs})", f"{ipp_rate:,.0f}", "1.0x", ""),
                (f"kernel CPU, widget following {opts.progress_jobs} jobs", f"{kernel_cpu * 100:.1f}% of a core",
                 f"over {kernel_wall:.0f} s", "<= 5%"),
                (f"kernel CPU, widget + --live, {opts.progress_jobs} jobs, while running",
                 f"{live_running * 100:.1f}% of a core", f"{live_calls} calls", "<= 5%"),
                (f"kernel CPU, widget + --live, {opts.progress_jobs} jobs, whole cell",
                 f"{live_cpu * 100:.1f}% of a core", f"over {live_wall:.0f} s (the last call reads every result)", ""),
            ]
        if "notebook-big" in chosen:
            magic, theirs, ratio = notebook_big_figures(engine, opts.slow_repeat, opts.notebook_big_jobs)
            n = opts.notebook_big_jobs
            rows += [
                (f"%%mpimap -o, {n} x 2 MB results, all read, 4 engines", f"{magic:.1f} s",
                 f"{ratio:.1f}x ipyparallel", "<= 1.5x"),
                (f"ipyparallel load-balanced map, {n} x 2 MB, same engines", f"{theirs:.1f} s", "1.0x", ""),
            ]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--slow-repeat", type=int, default=None, metavar="N",
                        help="repeats for the big, notebook-big and million sections (default: --repeat)")
    parser.add_argument("--only", type=sections, default=list(SECTIONS), metavar="LIST",
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--skip", type=sections, default=[], metavar="LIST", help="comma-separated sections to skip")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--seed-jobs", type=int, default=2000, help="jobs for the blog post's Tasker (slow)")
    parser.add_argument("--ipp-jobs", type=int, default=2000, help="jobs for ipyparallel's map (slow)")
    parser.add_argument("--no-notebook", action="store_true", help="skip the notebook and notebook-big sections")
    parser.add_argument("--progress-jobs", type=int, default=100000, help="jobs for the kernel CPU row")
    parser.add_argument("--big-jobs", type=int, default=240, help="2 MB array jobs, script path (default 240)")
    parser.add_argument("--notebook-big-jobs", type=int, default=200, help="2 MB array jobs, %%%%mpimap (default 200)")
    parser.add_argument("--million-jobs", type=int, default=1_000_000, help="no-op jobs for rank 0's peak memory")
    opts = parser.parse_args()
    if opts.slow_repeat is None:
        opts.slow_repeat = opts.repeat
    chosen = [name for name in SECTIONS if name in opts.only and name not in opts.skip
              and not (opts.no_notebook and name.startswith("notebook"))]
    rows = []
    if "noop" in chosen:
        rows += noop_rows(opts)
    if "big" in chosen:
        rows += big_rows(opts.slow_repeat, opts.big_jobs)
    if "grid" in chosen:
        rows += grid_rows()
    if "million" in chosen:
        rows += million_rows(opts.slow_repeat, opts.million_jobs)
    if "notebook" in chosen or "notebook-big" in chosen:
        rows += notebook_rows(opts, chosen)
    print(f"median of {opts.repeat} alternated runs ({opts.slow_repeat} for 2 MB results and "
          f"{opts.million_jobs:,} jobs), {opts.jobs} no-op jobs ({opts.seed_jobs} for the blog post's Tasker), "
          f"{os.cpu_count()} cores; sections: {','.join(chosen)}")
    widths = [max(len(r[i]) for r in rows + [("measure", "value", "ratio", "goal")]) for i in range(4)]
    header = ("measure", "value", "ratio", "goal")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
