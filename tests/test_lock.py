"""The run lock and the one liveness rule: never two holders, never a live run's lock taken, never a dead one kept.
Real processes throughout: a lock is only as good as its behaviour between processes."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from mpitasker_ext import follow, lock, progress, rundir
from mpitasker_ext.errors import RunLocked
from mpitasker_ext.tasker import Tasker

ELSEWHERE = "another-host.invalid"
HEARTBEAT = 2.0  # seconds between a held lock's mtime refreshes


def proc_start(pid):
    """Field 22 of /proc/<pid>/stat: with the pid, what tells a process from a later one reusing the pid."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


@pytest.fixture
def run(tmp_path):
    r = rundir.RunDir(str(tmp_path / "out.pkl"))
    r.create()
    return r


def write_lock(run, age=0.0, **holder):
    path = run.path(rundir.LOCK)
    with open(path, "w") as f:
        if holder:
            json.dump(holder, f)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def write_status(run, **fields):
    now = time.time()
    status = {"format": 1, "state": "running", "output": run.output, "total": 10, "done": 0, "failed": 0,
              "started": now - 100, "updated": now - 100, "host": ELSEWHERE, "pid": 4242}
    status.update(fields)
    run.write_status(status)


def holder_pid(run):
    return json.load(open(run.path(rundir.LOCK)))["pid"]


def _race(outputs, barrier, results):
    """One contender: for each output, try to take its stale lock at the same moment as the others."""
    from mpitasker_ext.errors import RunLocked
    from mpitasker_ext.rundir import RunDir

    for output in outputs:
        run = RunDir(output)
        barrier.wait()
        try:
            run.acquire_lock()
            outcome = "won"
        except RunLocked:
            outcome = "locked"
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            outcome = f"error {exc!r}"
        results.put((output, outcome))
        barrier.wait()
        run.release_lock()


def test_racing_takers_of_a_stale_lock_never_both_win(tmp_path):
    rounds, contenders = 80, 3
    outputs = []
    for i in range(rounds):
        run = rundir.RunDir(str(tmp_path / f"out{i}.pkl"))
        run.create()
        write_lock(run, age=3600, pid=4242, host=ELSEWHERE, since=0)
        outputs.append(run.output)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(contenders), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(outputs, barrier, results)) for _ in range(contenders)]
    for p in procs:
        p.start()
    outcomes = {}
    for _ in range(rounds * contenders):
        output, outcome = results.get(timeout=120)
        outcomes.setdefault(output, []).append(outcome)
    for p in procs:
        p.join(30)
    bad = {os.path.basename(o): r for o, r in outcomes.items() if sorted(r) != ["locked"] * (contenders - 1) + ["won"]}
    assert not bad, f"rounds without exactly one winner: {bad}"


def test_a_lock_being_written_is_not_taken_over(run):
    write_status(run, state="interrupted", updated=time.time() - 3600)   # an earlier run's
    write_lock(run)                                                        # created, content not written yet
    with pytest.raises(RunLocked, match="empty or unreadable"):
        run.acquire_lock()
    with open(run.path(rundir.LOCK), "w") as f:
        f.write('{"pid": 12')                                              # half written
    with pytest.raises(RunLocked):
        run.acquire_lock()


def test_an_abandoned_empty_lock_is_taken_over(run):
    write_lock(run, age=lock.LOCK_STALE_AFTER + 60)
    with run.locked():
        assert holder_pid(run) == os.getpid()
    assert not os.path.exists(run.path(rundir.LOCK))


def test_a_remote_holder_is_judged_by_its_heartbeat_not_by_an_old_status(run):
    write_status(run, updated=time.time() - 3600)
    path = write_lock(run, pid=4242, host=ELSEWHERE, since=time.time() - 3600)
    with pytest.raises(RunLocked, match=f"pid 4242 on host {ELSEWHERE}"):
        run.acquire_lock()
    stamp = time.time() - lock.LOCK_STALE_AFTER - 10
    os.utime(path, (stamp, stamp))
    run.acquire_lock()
    try:
        assert holder_pid(run) == os.getpid()
    finally:
        run.release_lock()


def test_the_heartbeat_keeps_a_held_lock_fresh(run):
    run.acquire_lock()
    try:
        path = run.path(rundir.LOCK)
        old = time.time() - 100
        os.utime(path, (old, old))
        time.sleep(2.5 * HEARTBEAT)
        assert time.time() - os.stat(path).st_mtime < 2 * HEARTBEAT
        other = rundir.RunDir(run.output)
        with pytest.raises(RunLocked):
            other.acquire_lock()
    finally:
        run.release_lock()
    assert not os.path.exists(path)


def test_a_reused_pid_is_not_the_holder(run):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = proc_start(live.pid)
        write_lock(run, pid=live.pid, host=socket.gethostname(), since=time.time(), start=start)
        with pytest.raises(RunLocked, match=f"pid {live.pid}"):
            run.acquire_lock()
        write_lock(run, pid=live.pid, host=socket.gethostname(), since=time.time(), start=start + 1)
        run.acquire_lock()
        try:
            assert holder_pid(run) == os.getpid()
        finally:
            run.release_lock()
    finally:
        live.kill()
        live.wait()


def test_takers_wait_for_a_takeover_in_progress_and_clear_an_abandoned_one(run):
    write_lock(run, age=3600, pid=4242, host=ELSEWHERE, since=0)
    guard = run.path(rundir.LOCK) + ".takeover"
    open(guard, "w").close()
    with pytest.raises(RunLocked, match="taking over"):
        run.acquire_lock()
    old = time.time() - 60
    os.utime(guard, (old, old))
    run.acquire_lock()
    try:
        assert holder_pid(run) == os.getpid() and not os.path.exists(guard)
    finally:
        run.release_lock()


def test_release_leaves_a_lock_that_is_no_longer_ours(run):
    run.acquire_lock()
    write_lock(run, pid=4242, host=ELSEWHERE, since=time.time(), token="someone-else")
    run.release_lock()
    assert holder_pid(run) == 4242


HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from mpitasker_ext.rundir import RunDir
RunDir({output!r}).acquire_lock()
print("held", flush=True)
time.sleep(60)
"""


def test_readers_see_a_run_alive_while_its_lock_beats(run):
    write_status(run, updated=time.time() - 60)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO, output=run.output)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        time.sleep(2 * HEARTBEAT)
        assert progress.read_progress(run.output).state == progress.RUNNING
    finally:
        holder.kill()
        holder.wait()
    stamp = time.time() - 2 * progress.STALE_AFTER
    os.utime(run.path(rundir.LOCK), (stamp, stamp))
    assert progress.read_progress(run.output).state == progress.STALE


class RecordingView:
    def __init__(self):
        self.updates, self.closed = [], []

    def update(self, p):
        self.updates.append((p.state, p.started))

    def close(self, p):
        self.closed.append(p.state)


def _slow(x):
    time.sleep(0.1)
    return x * x


def test_a_no_wait_view_follows_the_new_run_past_an_old_interrupted_status(run):
    write_status(run, state="interrupted", host=socket.gethostname(), pid=os.getpid(),
                 started=time.time() - 600, updated=time.time() - 500)
    view = RecordingView()
    since = time.time()
    follower = follow.Follower(run.output, view, background=True, since=since)
    time.sleep(1.0)
    assert view.closed == [], "the view closed on the previous run's status"
    worker = threading.Thread(target=lambda: Tasker("serial", progress=False).map(run.output, _slow, range(30)))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    follower.stop()
    running = [started for state, started in view.updates if state == progress.RUNNING]
    assert running and all(started >= since for started in running)
    assert not any(state == "interrupted" for state, _ in view.updates)
    assert view.closed == [progress.FINISHED]


def test_a_run_that_never_starts_does_not_end_its_view_with_the_earlier_runs_state(run):
    """A code-change question (or RunLocked) stops the submitted run before it writes a status: the view must
    not close on the earlier run's snapshot as if it were this run's (it showed the earlier run as finished)."""
    Tasker("serial", progress=False).map(run.output, _slow, range(3))
    earlier = follow.earlier_run(run.output)
    view = RecordingView()
    follower = follow.Follower(run.output, view, since=time.time(), earlier=earlier)
    follower.refresh()
    follower.stop()                                    # the run ended without ever starting
    assert view.updates == [] and view.closed == []
