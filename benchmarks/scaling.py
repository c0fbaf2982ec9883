"""Scale, simulated on one machine: many oversubscribed ranks, a million jobs, a restart over a million records.
Prints one table; docs/scaling.md keeps a copy and the reasoning for 1,000 ranks.

    .venv/bin/python benchmarks/scaling.py [--ranks 64] [--jobs 1000000]
"""

import argparse
import os
import sys

from throughput import MILLION, run

MANY_RANKS = """
    import resource, sys, time
    from mpi4py import MPI
    from mpitasker_ext import mpimap
    N = int(sys.argv[1])
    world = MPI.COMM_WORLD
    world.Barrier()
    t = time.perf_counter()
    values = mpimap(lambda x: 3 * x, range(N), 'many.pkl', progress=False)
    wall = time.perf_counter() - t
    ok = world.allreduce(int(values == [3 * x for x in range(N)]), op=MPI.SUM)
    # idle cost: one job sleeps 3 s, every other rank waits
    def job(x):
        if x == 0:
            time.sleep(3)
        return x
    world.Barrier()
    c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    mpimap(job, range(world.size - 1), 'idle.pkl', progress=False)
    c1, idle_wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    share = ((c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)) / idle_wall
    shares = world.gather(share, root=0)
    if world.rank == 0:
        print('MANY', N / wall, ok, max(shares), sum(shares) / len(shares), sum(shares))
"""

RESTART = """
    import os, sys, time
    from mpitasker_ext.identity import args_digest
    from mpitasker_ext.payload import encode_value
    from mpitasker_ext.reuse import prepare
    from mpitasker_ext.rundir import RunDir
    from mpitasker_ext.sweep import Sweep
    N = int(sys.argv[1])
    run = RunDir('restart.pkl')
    run.create()
    journals = [run.new_journal(r) for r in range(1, 4)]
    for i in range(N):
        journals[i % 3].append_value(i, args_digest(i), 0.0, encode_value(i))
    for j in journals:
        j.close()
    sweep = Sweep(lambda x: x, list(range(N)), 'restart.pkl')
    t = time.perf_counter()
    prepared = prepare(sweep)
    scan = time.perf_counter() - t
    prepared.run.release_lock()
    size = sum(os.path.getsize(p) for p in run.journal_paths())
    print('RESTART', scan, len(prepared.pending), prepared.cached, size / 2**20)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--rank-jobs", type=int, default=10000)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    opts = parser.parse_args()
    rate, ok, busiest, mean, total = run(MANY_RANKS, opts.ranks, opts.rank_jobs, marker="MANY")
    mrate, mwall, rss, files, mok = run(MILLION, 4, opts.jobs, marker="MILLION")
    scan, pending, cached, size = run(RESTART, 0, opts.jobs, marker="RESTART")
    rows = [
        (f"{opts.ranks} ranks (oversubscribed on {os.cpu_count()} cores), {opts.rank_jobs:,} no-op jobs",
         f"{rate:,.0f} jobs/s", f"correct on {int(ok)}/{opts.ranks} ranks"),
        (f"{opts.ranks} ranks waiting on one 3 s job: CPU per rank",
         f"max {busiest * 100:.1f}%, mean {mean * 100:.1f}%",
         f"all ranks together {total * 100:.0f}% of a core"),
        (f"{opts.jobs:,} no-op jobs, -n 4", f"{mrate:,.0f} jobs/s ({mwall:.1f} s)", f"correct={bool(mok)}"),
        (f"{opts.jobs:,} jobs: rank 0 peak memory", f"{rss:,.0f} MiB", "holds every argument and result"),
        (f"{opts.jobs:,} jobs: most files in the .mpi dir", f"{files:.0f}",
         "manifest, status, lock + 1 journal/worker"),
        (f"restart scan of {opts.jobs:,} cached records", f"{scan:.2f} s",
         f"{size:.0f} MiB of journals, {cached:,.0f} reused, {pending:.0f} to run"),
    ]
    widths = [max(len(r[i]) for r in rows + [("measure", "value", "note")]) for i in range(3)]
    for row in [("measure", "value", "note"), tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
