"""A parameter sweep: steady-state amplitude of a driven, damped oscillator on a grid of (omega, gamma).

Run it on 4 ranks (rank 0 schedules, 3 compute):   mpiexec -n 4 python -u examples/sweep.py
Kill it half way (Ctrl-C) and run it again: only the missing points are computed.
Results land in sweep.pkl as (index, [(omega, gamma)], amplitude) triples.
"""

import itertools
import logging
import math
import sys

from mpitasker_ext import Tasker


def amplitude(omega, gamma, periods=40, steps_per_period=200):
    """Integrate x'' + gamma x' + x = cos(omega t) with RK4 and return the late-time amplitude."""
    dt = 2 * math.pi / omega / steps_per_period
    x = v = t = 0.0
    peak = 0.0

    def accel(x, v, t):
        return math.cos(omega * t) - gamma * v - x

    for step in range(periods * steps_per_period):
        k1x, k1v = v, accel(x, v, t)
        k2x, k2v = v + dt / 2 * k1v, accel(x + dt / 2 * k1x, v + dt / 2 * k1v, t + dt / 2)
        k3x, k3v = v + dt / 2 * k2v, accel(x + dt / 2 * k2x, v + dt / 2 * k2v, t + dt / 2)
        k4x, k4v = v + dt * k3v, accel(x + dt * k3x, v + dt * k3v, t + dt)
        x += dt / 6 * (k1x + 2 * k2x + 2 * k3x + k4x)
        v += dt / 6 * (k1v + 2 * k2v + 2 * k3v + k4v)
        t += dt
        if step >= (periods - 5) * steps_per_period:
            peak = max(peak, abs(x))
    return peak


def main(output="sweep.pkl"):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    omegas = [0.5 + 0.1 * i for i in range(11)]
    gammas = [0.1, 0.2, 0.4, 0.8]
    with Tasker() as tsk:
        data = tsk.map(output, lambda p: amplitude(*p), itertools.product(omegas, gammas))
    if tsk.isroot():
        print(f"{len(data)} points in {output}; resonance curve for gamma=0.1:")
        for _, [(omega, gamma)], amp in data:
            if gamma == 0.1:
                exact = 1 / math.sqrt((1 - omega ** 2) ** 2 + (gamma * omega) ** 2)
                print(f"  omega={omega:.1f}  amplitude={amp:7.3f}  (analytic {exact:7.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
