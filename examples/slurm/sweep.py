"""The sweep the Slurm examples run: a grid of (omega, gamma) points, each a few seconds of work.

Every process of the job runs this same script; rank 0 schedules, the others compute. Finished points are
journaled in sweep.pkl.mpi/ as they end, so a job killed by its wall time, scancel or a node failure loses
nothing finished: submit it again and only the missing points run.
"""

import itertools
import math
import os
import sys
import time

from mpitasker_ext import Tasker


def point(params):
    omega, gamma = params
    seconds = float(os.environ.get("SWEEP_SECONDS_PER_POINT", "2"))
    end = time.time() + seconds              # stands for a real computation of that length
    while time.time() < end:
        time.sleep(0.01)
    return 1 / math.sqrt((1 - omega ** 2) ** 2 + (gamma * omega) ** 2)


def main(output="sweep.pkl", points=None):
    omegas = [0.5 + 0.05 * i for i in range(20)]
    gammas = [0.1, 0.3, 1.0]
    grid = list(itertools.product(omegas, gammas))[: int(points) if points else None]
    with Tasker() as tsk:
        data = tsk.map(output, point, grid)
    if tsk.isroot():
        print(f"{len(data)} points in {output}; peak amplitude {max(r for _, _, r in data):.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
