"""Faults: kills at random moments, a dying worker, jobs that kill their process, Ctrl-C, a second run on the
same output, a full disk, and every kind of cache damage. Nothing finished may be lost or recomputed."""

import collections
import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import seed_load, tmpfs, wait_lock_holder_gone
from mpitasker_ext import journal, rundir
from mpitasker_ext.scan import journal_records

TORTURE_JOB = """
    import os, sys, time
    from mpitasker_ext import Tasker
    def work(x):
        time.sleep(0.001)
        fd = os.open('exec.log', os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f'{x}\\n'.encode())
        os.close(fd)
        return (x * 7919) % 1000003
    with Tasker() as tsk:
        tsk.map('out.pkl', work, range(int(sys.argv[1])))
"""


def finished_indices(run_dir):
    return {rec.index for rec in rundir.RunDir(run_dir[:-4]).read_records() if rec.ok}


def test_kill_torture_whole_job(runner):
    """kill -9 of the whole MPI job at many random moments; no finished job ever runs again."""
    n_jobs = 3000
    runner.write("job.py", TORTURE_JOB)
    run_dir = runner.path("out.pkl.mpi")
    rng = random.Random(20261125)
    kills = 0
    for _attempt in range(12):
        before_log = len(runner.executions())
        proc = runner.start("job.py", 4, n_jobs)
        deadline = time.time() + 30
        target = before_log + rng.randint(50, 400)
        while len(runner.executions()) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        kills += 1
        wait_lock_holder_gone(run_dir)
        finished = finished_indices(run_dir)
        log_mark = len(runner.executions())
        # the next run (killed or not) must not execute any of these again
        proc = runner.start("job.py", 4, n_jobs)
        time.sleep(rng.uniform(0.2, 0.6))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            kills += 1
            wait_lock_holder_gone(run_dir)
        rerun = runner.executions()[log_mark:]
        assert not finished.intersection(rerun), f"finished jobs ran again: {sorted(finished & set(rerun))[:10]}"
        if os.path.exists(runner.path("out.pkl")):
            break
    assert kills >= 6
    final = runner.run("job.py", 4, n_jobs, check=False)
    assert final.returncode == 0, final.stderr
    assert [r for (_, _, r) in seed_load(runner.path("out.pkl"))] == [(x * 7919) % 1000003 for x in range(n_jobs)]
    runs = collections.Counter(runner.executions())
    assert set(runs) == set(range(n_jobs))
    assert sum(c - 1 for c in runs.values()) <= 3 * kills      # only jobs in flight at a kill ran twice


def test_killing_one_worker_names_it_and_the_rerun_resumes(runner):
    runner.write("job.py", TORTURE_JOB.replace("time.sleep(0.001)", "time.sleep(0.01)"))
    run_dir = runner.path("out.pkl.mpi")
    proc = runner.start("job.py", 4, 600)
    journals = lambda: [p for p in os.listdir(run_dir) if p.startswith("journal-")] if os.path.isdir(run_dir) \
        else []                                                                           # noqa: E731
    deadline = time.time() + 30
    while len(journals()) < 3 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    headers = [journal.parse_header(open(os.path.join(run_dir, p), "rb").read())[1] for p in journals()]
    victim = next(h for h in headers if h.get("rank") == 2)
    os.kill(victim["pid"], signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode != 0                # MPI stops every rank; its own report may name another pid
    wait_lock_holder_gone(run_dir)
    done_before = finished_indices(run_dir)
    mark = len(runner.executions())
    final = runner.run("job.py", 4, 600, check=False)
    assert final.returncode == 0, final.stderr
    assert f"(rank 2, pid {victim['pid']} on " in final.stderr       # the rerun names the dead rank's job
    assert not done_before.intersection(runner.executions()[mark:])
    assert len(seed_load(runner.path("out.pkl"))) == 600


@pytest.mark.parametrize("how", ["os._exit(3)", "__import__('ctypes').string_at(0)"])
def test_a_job_that_kills_its_process_is_named(runner, how):
    runner.write("job.py", f"""
        import os
        from mpitasker_ext import mpimap
        def work(x):
            if x == 17:
                {how}
            return x
        mpimap(work, range(40), 'out.pkl', chunksize=1)
    """)
    first = runner.run("job.py", 3, check=False)
    assert first.returncode != 0
    second = runner.run("job.py", 3, check=False)
    assert second.returncode != 0 and "job 17 (rank" in second.stderr
    third = runner.run("job.py", 3, check=False)
    assert "job 17 was running each of the 2 times a process of this sweep died" in third.stderr
    assert "kills its own process" in third.stderr and "fn(args[17])" in third.stderr


def test_ctrl_c_on_mpiexec_stops_quickly_and_resumes(runner):
    runner.write("job.py", """
        import time
        from mpitasker_ext import mpimap
        def work(x):
            time.sleep(0.5 if x < 6 else 30)
            with open('exec.log', 'a') as f:
                f.write(f'{x}\\n')
            return x
        mpimap(work, range(12), 'out.pkl', chunksize=1)
    """)
    proc = runner.start("job.py", 4)
    deadline = time.time() + 30
    while len(runner.executions()) < 6 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)                                    # every worker is now inside a 30 s job
    sent = time.time()
    os.kill(proc.pid, signal.SIGINT)                   # what Ctrl-C in the terminal sends to mpiexec
    proc.communicate(timeout=30)
    assert time.time() - sent < 5, "the ranks did not stop within 5 s"
    status = json.load(open(runner.path("out.pkl.mpi", "status.json")))
    assert status["state"] == "interrupted"
    assert finished_indices(runner.path("out.pkl.mpi")) == set(range(6))
    wait_lock_holder_gone(runner.path("out.pkl.mpi"))
    runner.write("job.py", open(runner.path("job.py")).read().replace("30", "0.01"))
    assert runner.run("job.py", 4, check=False).returncode == 0
    assert sorted(runner.executions()[6:]) == list(range(6, 12))


def test_second_run_on_the_same_output_is_refused(runner):
    runner.write("job.py", TORTURE_JOB.replace("time.sleep(0.001)", "time.sleep(0.05)"))
    first = runner.start("job.py", 3, 200)
    deadline = time.time() + 30
    while not os.path.exists(runner.path("out.pkl.mpi", rundir.LOCK)) and time.time() < deadline:
        time.sleep(0.02)
    second = runner.run("job.py", 3, 200, check=False)
    assert second.returncode != 0 and "RunLocked" in second.stderr
    assert "is being computed by another process (pid" in second.stderr
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert collections.Counter(runner.executions()) == collections.Counter(range(200))


@pytest.fixture
def small_disk(tmp_path):
    unmount = tmpfs(tmp_path / "disk", "size=400k")
    yield tmp_path / "disk"
    unmount()


def test_full_disk_is_a_clear_error_and_keeps_every_record(runner, small_disk):
    runner.write("job.py", f"""
        import os, sys
        from mpitasker_ext import mpimap
        def work(x):
            with open('exec.log', 'a') as f:
                f.write(f'{{x}}\\n')
            return os.urandom(2000) if x % 2 else bytes(2000)
        mpimap(work, range(int(sys.argv[1])), {str(small_disk / 'out.pkl')!r}, chunksize=1)
    """)
    full = runner.run("job.py", 3, 400, check=False)
    assert full.returncode != 0
    assert "No space left on device" in full.stderr and "finished jobs are kept in" in full.stderr.replace(
        "Every finished job is kept in", "finished jobs are kept in")
    run_dir = str(small_disk / "out.pkl.mpi")
    kept = finished_indices(run_dir)
    assert 20 < len(kept) < 400
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    mark = len(runner.executions())
    again = runner.run("job.py", 3, 400, check=False)
    assert again.returncode == 0, again.stderr
    assert not kept.intersection(runner.executions()[mark:])
    assert len(seed_load(small_disk / "out.pkl")) == 400


def damaged_run(runner):
    """A run that keeps its directory: job 29 fails; 29 records are finished."""
    runner.write("job.py", """
        import os, sys
        from mpitasker_ext import mpimap
        def work(x):
            with open('exec.log', 'a') as f:
                f.write(f'{x}\\n')
            if x == 29 and not os.path.exists('fixed'):
                raise ValueError('not yet')
            return 'r%d' % x * 20
        mpimap(work, range(30), 'out.pkl')
    """)
    assert runner.run("job.py", 3, check=False).returncode != 0
    open(runner.path("fixed"), "w").close()
    run_dir = runner.path("out.pkl.mpi")
    journals = sorted(os.path.join(run_dir, p) for p in os.listdir(run_dir) if p.startswith("journal-"))
    return run_dir, journals


def flip_middle_byte(journals):
    path = max(journals, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    needle = data.find(b"r", len(data) // 2)
    data[needle + 3] ^= 0x55
    open(path, "wb").write(bytes(data))
    return path, 1


def add_garbage_journal(journals):
    path = os.path.join(os.path.dirname(journals[0]), "journal-r00009-garbage.bin")
    open(path, "wb").write(os.urandom(500))
    return path, 0


def add_empty_journal(journals):
    path = os.path.join(os.path.dirname(journals[0]), "journal-r00009-empty.bin")
    open(path, "wb").close()
    return None, 0


def make_journal_unreadable(journals):
    path = journals[0]
    count = sum(1 for rec in journal_records(path) if rec.ok)
    os.remove(path)
    os.mkdir(path)                                   # reading it now fails (root ignores chmod 000)
    return path, count


def wrong_version_journal(journals):
    path = journals[0]
    data = open(path, "rb").read()
    count = sum(1 for rec in journal_records(path) if rec.ok)
    current = b"MPITASKER-JOURNAL %d" % journal.FORMAT_VERSION
    open(path, "wb").write(data.replace(current, b"MPITASKER-JOURNAL 7", 1))
    return path, count


def damage_manifest(journals):
    """The manifest only describes the run for readers now (each journal names its own code): damage to it
    loses nothing and is simply rewritten."""
    path = os.path.join(os.path.dirname(journals[0]), rundir.MANIFEST)
    open(path, "wb").write(b"{not json")
    return None, 0


def remove_manifest(journals):
    os.remove(os.path.join(os.path.dirname(journals[0]), rundir.MANIFEST))
    return None, 0


@pytest.mark.parametrize("damage", [flip_middle_byte, add_garbage_journal, add_empty_journal,
                                    make_journal_unreadable, wrong_version_journal, damage_manifest,
                                    remove_manifest])
def test_damaged_cache_is_reported_and_only_the_damage_recomputed(runner, damage):
    _run_dir, journals = damaged_run(runner)
    named, lost = damage(journals)
    mark = len(runner.executions())
    proc = runner.run("job.py", 3, check=False)
    assert proc.returncode == 0, proc.stderr
    if named:
        assert str(named) in proc.stderr, proc.stderr
    rerun = runner.executions()[mark:]
    assert 29 in rerun and len(rerun) == 1 + lost, rerun
    assert [r for (_, _, r) in seed_load(runner.path("out.pkl"))] == [f"r{x}" * 20 for x in range(30)]


def test_half_written_output_is_written_again_from_the_store(runner):
    runner.write("job.py", TORTURE_JOB)
    runner.run("job.py", 3, 100)
    data = open(runner.path("out.pkl"), "rb").read()
    open(runner.path("out.pkl"), "wb").write(data[: len(data) // 2])
    mark = len(runner.executions())
    proc = runner.run("job.py", 3, 100, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(seed_load(runner.path("out.pkl"))) == 100
    assert runner.executions()[mark:] == []              # the results came from the store, none recomputed
    os.unlink(runner.path("out.pkl"))                    # and so does a deleted output
    assert runner.run("job.py", 3, 100, check=False).returncode == 0 and runner.executions()[mark:] == []
    assert len(seed_load(runner.path("out.pkl"))) == 100


def test_code_change_warns_in_scripts(runner):
    runner.write("job.py", """
        import os
        from mpitasker_ext import mpimap
        K = int(os.environ.get('K', '1'))
        def work(x):
            if x == 5 and not os.path.exists('fixed'):
                raise ValueError('later')
            return x * K
        print(mpimap(work, range(8), 'out.pkl'))
    """)
    assert runner.run("job.py", 3, check=False).returncode != 0
    open(runner.path("fixed"), "w").close()
    proc = runner.run("job.py", 3, check=False, env={"K": "2"})
    assert proc.returncode == 0 and "code changed" in proc.stderr and "reusing the cached results" in proc.stderr
    assert "[0, 1, 2, 3, 4, 10, 6, 7]" in proc.stdout        # documented 'warn' policy: reuse, recompute failures
