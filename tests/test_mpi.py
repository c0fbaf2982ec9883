"""Real mpiexec runs: the behaviour users rely on when a week of cluster time is at stake."""

import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import COUNTING_JOB, REPO, seed_load, wait_lock_holder_gone

SEED_DIR = os.path.join(os.path.dirname(REPO), "shared", "reference", "seed_tasker")


def test_seed_job_matches_the_reference_tasker(runner):
    runner.write("job.py", """
        from mpitasker_ext import Tasker
        with Tasker() as tsk:
            print(f'task={tsk}, rank={tsk.rank}')
            data = tsk.map('foo.pkl', lambda x: str(x), range(100))
        print('GOT', tsk.rank, len(data), data[7], flush=True)
    """)
    proc = runner.run("job.py", 4)
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("GOT")) == \
        [f"GOT {r} 100 (7, [7], '7')" for r in range(4)]
    assert not os.path.exists(runner.path("foo.pkl.mpi"))
    ours = seed_load(runner.path("foo.pkl"))
    assert ours == [(i, [i], str(i)) for i in range(100)]
    if os.path.isdir(SEED_DIR):
        ref = runner.path("ref")
        os.makedirs(ref)
        for name in ("job.py", "mp.py", "tools.py"):
            with open(os.path.join(SEED_DIR, name)) as src, open(os.path.join(ref, name), "w") as dst:
                dst.write(src.read())
        subprocess.run([runner.mpiexec, "-n", "4", sys.executable, "-u", "job.py"], cwd=ref, check=True,
                       capture_output=True, timeout=120)
        assert seed_load(os.path.join(ref, "foo.pkl")) == ours


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_worlds_and_closures_over_locals(runner, n):
    runner.write("job.py", """
        from mpitasker_ext import mpimap
        def main():
            scale, offset = 3, {'a': 1}
            def inner(x):
                return x * scale + offset['a']
            return mpimap(lambda x: inner(x) - 1, range(40), 'out.pkl')
        values = main()
        from mpi4py import MPI
        print('VALUES', MPI.COMM_WORLD.rank, values == [3 * x for x in range(40)], flush=True)
    """)
    proc = runner.run("job.py", n)
    assert proc.stdout.count("True") == n and "False" not in proc.stdout
    assert seed_load(runner.path("out.pkl"))[39] == (39, [39], 117)


def test_exceptions_inside_with_tasker_propagate(runner):
    runner.write("boom.py", """
        from mpitasker_ext import Tasker
        with Tasker() as tsk:
            raise ValueError('must not be swallowed')
        print('REACHED')
    """)
    proc = runner.run("boom.py", 0, check=False)
    assert proc.returncode != 0 and "must not be swallowed" in proc.stderr and "REACHED" not in proc.stdout


def test_failing_jobs_are_listed_and_rerun_alone(runner):
    runner.write("job.py", """
        import os
        from mpitasker_ext import Tasker, JobsFailed
        def work(x):
            with open('exec.log', 'a') as f:
                f.write(f'{x}\\n')
            if x % 10 == 3 and not os.path.exists('fixed'):
                raise RuntimeError(f'bad input {x}')
            return -x
        with Tasker() as tsk:
            try:
                tsk.map('out.pkl', work, range(60))
            except JobsFailed as exc:
                print('FAILED', tsk.rank, exc.indices, flush=True)
                raise
    """)
    first = runner.run("job.py", 4, check=False)
    assert first.returncode != 0
    assert first.stdout.count("FAILED") == 4 and "[3, 13, 23, 33, 43, 53]" in first.stdout
    assert "RuntimeError: bad input 3" in first.stderr and "6 of 60 jobs failed" in first.stderr
    assert sorted(runner.executions()) == list(range(60))
    open(runner.path("fixed"), "w").close()
    runner.run("job.py", 4)
    assert sorted(runner.executions()[60:]) == [3, 13, 23, 33, 43, 53]
    assert [r for (_, _, r) in seed_load(runner.path("out.pkl"))] == [-x for x in range(60)]


WHERE_JOB = """
    import json, socket, time
    from mpi4py import MPI
    from mpitasker_ext import Tasker, JobsFailed
    def work(x):
        time.sleep(0.01)                             # so both workers take jobs
        if x % 4 == 1:
            raise ValueError(f'job {x} saw rank {MPI.COMM_WORLD.rank} host {socket.gethostname()}')
        return x
    with Tasker(chunksize=1) as tsk:
        try:
            tsk.map('out.pkl', work, range(40))
        except JobsFailed as exc:
            if tsk.rank == 0:
                print('FAILURES', json.dumps(exc.failures), flush=True)
                print('MESSAGE', json.dumps(str(exc)), flush=True)
            raise
"""


def test_a_failed_job_names_the_rank_and_host_it_ran_on(runner):
    from mpitasker_ext import progress as pm
    from mpitasker_ext import rundir

    runner.write("job.py", WHERE_JOB)
    proc = runner.run("job.py", 3, check=False)
    assert proc.returncode != 0
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
             if line.startswith(("FAILURES ", "MESSAGE "))}
    failures, message = {int(i): text for i, text in lines["FAILURES"].items()}, lines["MESSAGE"]
    host = socket.gethostname()
    seen = {}                                        # job index -> the rank the job itself saw
    for index, text in failures.items():
        rank = int(re.search(rf"ValueError: job {index} saw rank (\d+) host ", text).group(1))
        seen[index] = rank
        assert text.endswith(f"(the job ran on rank {rank} on {host})\n")
    assert sorted(seen) == list(range(1, 40, 4)) and set(seen.values()) <= {1, 2}  # workers only
    assert f"First failure, job 1 with argument 1 (rank {seen[1]} on {host}): ValueError" in message

    records = [r for r in rundir.RunDir(runner.path("out.pkl")).read_records() if not r.ok]
    assert {r.index: (r.failure()["rank"], r.failure()["host"]) for r in records} == \
        {index: (rank, host) for index, rank in seen.items()}
    with open(runner.path("out.pkl.mpi", rundir.STATUS)) as f:
        status = json.load(f)
    assert {f["index"]: (f["rank"], f["host"]) for f in status["failures"]} == \
        {index: (rank, host) for index, rank in seen.items()}
    shown = pm.read_progress(runner.path("out.pkl"))
    assert shown.state == "failed" and [(f.index, f.rank, f.host) for f in shown.failures] == \
        [(index, seen[index], host) for index in sorted(seen)]
    assert f"failed job 5 (rank {seen[5]} on {host}): ValueError: job 5 saw" in pm.render_text(shown)


def test_resume_after_kill_9_of_mpiexec_redoes_no_finished_job(runner):
    runner.write("job.py", COUNTING_JOB)
    proc = runner.start("job.py", 4, 2000, env={"DELAY": "0.003"})
    deadline = time.time() + 60
    target = random.randint(200, 1200)            # a random moment, measured in finished jobs
    while len(runner.executions()) < target and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_lock_holder_gone(runner.path("out.pkl.mpi"))
    assert not os.path.exists(runner.path("out.pkl")), "the kill came after the end"
    before = set(runner.executions())
    assert 0 < len(before) < 2000
    runner.run("job.py", 4, 2000)
    runs = collections.Counter(runner.executions())
    assert set(runs) == set(range(2000))
    repeated = [i for i, c in runs.items() if c > 1]
    assert len(repeated) <= 6, f"jobs run twice: {repeated}"       # at most the ones in flight at the kill
    assert [r for (_, _, r) in seed_load(runner.path("out.pkl"))] == [x * 10 for x in range(2000)]


def test_changed_args_recompute_only_the_changed_job_from_output(runner):
    runner.write("job.py", COUNTING_JOB)
    runner.run("job.py", 4, 30)
    assert runner.run("job.py", 4, 30, check=False, env={"SHIFT": "7"}).returncode == 0
    assert runner.executions()[30:] == [7]
    out = seed_load(runner.path("out.pkl"))
    assert out[7] == (7, [(7, "new")], ("changed", (7, "new"))) and out[8] == (8, [8], 80)


def test_changed_args_recompute_only_the_changed_job_from_journals(runner):
    runner.write("job.py", COUNTING_JOB.replace("return x * 10", "if x == 29 and not SHIFT: raise KeyError(x)\n"
                                                "        return x * 10"))
    assert runner.run("job.py", 4, 30, check=False).returncode != 0
    assert os.path.isdir(runner.path("out.pkl.mpi")) and len(runner.executions()) == 30
    assert runner.run("job.py", 4, 30, check=False, env={"SHIFT": "7"}).returncode == 0
    assert sorted(runner.executions()[30:]) == [7, 29]
    assert seed_load(runner.path("out.pkl"))[29] == (29, [29], 290)


def test_truncated_record_is_recomputed(runner):
    runner.write("job.py", COUNTING_JOB.replace("return x * 10", "if x == 29: raise SystemError('stop')\n"
                                                "        return x * 10"))
    runner.run("job.py", 3, 30, check=False)
    run_dir = runner.path("out.pkl.mpi")
    journals = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.startswith("journal-")]
    assert journals
    from mpitasker_ext.scan import journal_records
    last = {path: list(journal_records(path))[-1] for path in journals}
    victim = next(path for path, rec in last.items() if rec.ok)
    torn_index = last[victim].index
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 3)
    runner.write("job2.py", COUNTING_JOB)
    proc = runner.run("job2.py", 3, 30)
    rerun = runner.executions()[30:]
    assert sorted(rerun) == sorted([29, torn_index])   # the failed job and the one whose record was torn
    assert "torn tail" in proc.stderr
    assert [r for (_, _, r) in seed_load(runner.path("out.pkl"))] == [x * 10 for x in range(30)]


def test_serial_fallback_without_mpi4py(runner):
    runner.write("job.py", """
        import sys
        sys.modules['mpi4py'] = None
        from mpitasker_ext import Tasker
        with Tasker() as tsk:
            data = tsk.map('foo.pkl', lambda x: x * x, range(50))
        print('OK', tsk.size, data[49])
    """)
    proc = runner.run("job.py", 0)
    assert "OK 1 (49, [49], 2401)" in proc.stdout
    assert os.path.exists(runner.path("foo.pkl")) and not os.path.exists(runner.path("foo.pkl.mpi"))


def test_mpiexec_without_mpi4py_refuses_to_run_everything_everywhere(runner):
    runner.write("job.py", """
        import sys
        sys.modules['mpi4py'] = None
        from mpitasker_ext import Tasker
        Tasker().map('foo.pkl', str, range(5))
    """)
    proc = runner.run("job.py", 2, check=False)
    assert proc.returncode != 0 and "mpi4py cannot be imported" in proc.stderr
    assert not os.path.exists(runner.path("foo.pkl"))


def test_ranks_with_different_args_are_caught(runner):
    runner.write("job.py", """
        from mpi4py import MPI
        from mpitasker_ext import mpimap, UsageError
        args = [x + (MPI.COMM_WORLD.rank > 0) for x in range(20)]
        try:
            mpimap(str, args, 'out.pkl')
        except UsageError as exc:
            print('CAUGHT', MPI.COMM_WORLD.rank, 'differ between ranks' in str(exc), flush=True)
    """)
    proc = runner.run("job.py", 3)
    assert proc.stdout.count("True") == 3
    assert not os.path.exists(runner.path("out.pkl"))


def test_root_side_error_reaches_every_rank(runner):
    runner.write("job.py", """
        from mpi4py import MPI
        from mpitasker_ext import mpimap, MPITaskerError
        try:
            mpimap(str, range(5), 'no/such/dir/out.pkl')
        except MPITaskerError as exc:
            print('CAUGHT', MPI.COMM_WORLD.rank, type(exc).__name__, flush=True)
    """)
    proc = runner.run("job.py", 3, timeout=60)
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("CAUGHT")) == \
        [f"CAUGHT {r} UsageError" for r in range(3)]
