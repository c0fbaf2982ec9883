"""Command line: ``python -m mpitasker_ext status PATH [--watch | --job N]`` shows a run's progress (or what one
job printed) without MPI."""

import argparse
import sys
import time

from . import progress as progressmod
from .errors import MPITaskerError
from .joboutput import job_output
from .status import MISSING, RUNNING


def _job_output(opts):
    """What one job printed, to stdout as it was written; why there is nothing to show, to stderr."""
    try:
        text = job_output(opts.path, opts.job)
    except MPITaskerError as exc:
        print(exc, file=sys.stderr)
        return 1
    if text:
        sys.stdout.write(text)
    else:
        print(f"(job {opts.job} printed nothing)", file=sys.stderr)
    return 0


def _status(opts):
    if opts.job is not None:
        return _job_output(opts)
    tty = sys.stdout.isatty()
    while True:
        snapshot = progressmod.read_progress(opts.path)
        text = progressmod.render_text(snapshot)
        if opts.watch and tty:
            sys.stdout.write("\x1b[H\x1b[J" + text + "\n")
        else:
            print(text, flush=True)
        if not opts.watch or snapshot.state != RUNNING:
            return 1 if snapshot.state == MISSING else 0
        time.sleep(opts.interval)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mpitasker_ext", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="show a run's progress (counts, per-rank jobs, failures)")
    status.add_argument("path", help="the run's output file (e.g. sweep.pkl) or its .mpi directory")
    status.add_argument("--watch", action="store_true", help="keep refreshing until the run stops")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (--watch)")
    status.add_argument("--job", type=int, default=None, metavar="N",
                        help="print what job N printed (stdout and stderr, the last 64 KiB) instead")
    opts = parser.parse_args(argv)
    return _status(opts)


if __name__ == "__main__":
    sys.exit(main())
