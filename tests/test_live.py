"""Live results: the finished part of a run, read incrementally while it goes on (``--live``, ``partial()``)."""

import os
import threading
import time

from mpitasker_ext import mpimap
from mpitasker_ext.identity import args_digest
from mpitasker_ext.live import LiveResults, LiveView
from mpitasker_ext.payload import encode_value, read_value
from mpitasker_ext.rundir import RunDir
from mpitasker_ext.scan import read_appended


def test_a_frame_being_written_is_left_for_the_next_read(tmp_path):
    run = RunDir(str(tmp_path / "out.pkl"))
    run.create()
    writer = run.new_journal(1)
    for i in range(3):
        writer.append_value(i, args_digest(i), 0.0, encode_value(i * 10))
    writer.close()
    path = writer.path
    whole = open(path, "rb").read()
    with open(path, "rb+") as f:                      # the last frame only half written, as a reader may see it
        f.truncate(len(whole) - 5)
    records, resume = read_appended(path, 0)
    assert [(i, read_value(loc)) for i, _d, loc in records] == [(0, 0), (1, 10)]
    assert resume < len(whole) - 5
    with open(path, "ab") as f:
        f.write(whole[len(whole) - 5:])
    records, resume = read_appended(path, resume)
    assert [(i, read_value(loc)) for i, _d, loc in records] == [(2, 20)] and resume == len(whole)
    assert read_appended(path, resume) == ([], len(whole))


def slow_square(x):
    time.sleep(0.02)
    return x * x


def test_live_results_fill_in_while_the_run_goes_and_end_equal_to_the_results(tmp_path):
    output = str(tmp_path / "live.pkl")
    args = list(range(60))
    live = LiveResults(output, args)
    runner = threading.Thread(target=mpimap, args=(slow_square, args, output), kwargs={"progress": False})
    runner.start()
    seen = []
    while runner.is_alive():
        live.refresh()
        seen.append(len(live))
        indices, done_args, values = live.finished()
        assert all(v == a * a for a, v in zip(done_args, values, strict=True))   # every value is its own job's
        time.sleep(0.05)
    runner.join()
    live.refresh()
    assert seen == sorted(seen) and len(set(seen)) > 2              # it filled in, never went back
    assert live.finished() == (args, args, [a * a for a in args])


def test_stored_results_count_from_the_first_refresh_matched_by_argument(tmp_path):
    output = str(tmp_path / "grid.pkl")
    mpimap(slow_square, [3, 1, 2], output, progress=False)
    live = LiveResults(output, [1, 2, 3, 4])                         # a refined grid: other indices
    assert live.refresh() == 3
    assert live.finished() == ([0, 1, 2], [1, 2, 3], [1, 4, 9])
    assert live.refresh() == 0                                        # nothing new: nothing read again


class _Recorder:
    def __init__(self):
        self.updates, self.closed = 0, 0

    def update(self, progress):
        self.updates += 1

    def close(self, progress):
        self.closed += 1


def test_a_live_function_that_raises_is_reported_once_and_dropped(tmp_path):
    output = str(tmp_path / "grid.pkl")
    mpimap(slow_square, [1, 2], output, progress=False)
    said, calls = [], []

    def draw(args, values):
        calls.append((args, values))
        raise RuntimeError("axis gone")

    view = LiveView(_Recorder(), draw, LiveResults(output, [1, 2]), interval=0, report=said.append)
    view.update(None)
    view.update(None)
    view.final([1, 4])
    assert calls == [([1, 2], [1, 4])] and view.view.updates == 2
    assert len(said) == 1 and "--live draw raised RuntimeError: axis gone" in said[0]


def test_the_final_call_gets_every_result(tmp_path):
    output = str(tmp_path / "grid.pkl")
    calls = []
    view = LiveView(_Recorder(), lambda a, v: calls.append((a, v)), LiveResults(output, [5, 6]), interval=0)
    view.final([25, 36])
    assert calls == [([5, 6], [25, 36])]
    assert not os.path.exists(output)


def test_a_refresh_reads_at_most_its_budget_and_a_moved_journal_is_not_read_again(tmp_path):
    output = str(tmp_path / "grid.pkl")
    run = RunDir(output)
    run.create()
    writer = run.new_journal(1)
    for i in range(50):
        writer.append_value(i, args_digest(i), 0.0, encode_value(-i))
    writer.close()
    live = LiveResults(output, list(range(50)))
    assert live.refresh(max_results=20) == 20 and len(live) == 20
    assert live.refresh(max_results=20) == 20 and live.refresh() == 10 and live.complete
    moved = str(tmp_path / "moved.bin")
    os.rename(writer.path, moved)                    # as finish moves a run's journal into the store
    os.makedirs(output + ".cache")
    os.rename(moved, os.path.join(output + ".cache", os.path.basename(writer.path)))
    assert live.refresh() == 0 and live.finished()[2] == [-i for i in range(50)]


def test_a_stored_result_that_does_not_load_is_not_shown_and_does_not_stop_the_reading(tmp_path):
    """Rank 0 sets such a result aside and computes it again; the live view must neither raise (it would end
    the waiting cell, the --no-wait follower and partial()) nor show it, and shows the new record instead."""
    from conftest import unloadable_payload

    output = str(tmp_path / "gone.pkl")
    run = RunDir(output)
    run.create()
    first = run.new_journal(1)
    first.append(2, True, args_digest(2), 0.0, unloadable_payload())
    first.append_value(1, args_digest(1), 0.0, encode_value(10))
    first.close()
    live = LiveResults(output, list(range(4)))
    assert live.refresh() == 1 and live.finished() == ([1], [1], [10])
    again = run.new_journal(0)                           # rank 0 computed job 2 again
    again.append_value(2, args_digest(2), 0.0, encode_value(20))
    again.close()
    assert live.refresh() == 1 and live.finished() == ([1, 2], [1, 2], [10, 20])


def test_partial_never_shows_an_earlier_run_that_other_code_made(shell):
    """Right after a run (well within the clocks' slack), a --no-wait run of changed code stops with a
    code-change question and never starts: partial() must not show the earlier code's results, neither while
    it goes nor once it ended."""
    from mpitasker_ext import CodeChanged

    shell.run_cell_magic("mpimap", "early.pkl for x in range(4)", "x + 1\n")
    handle = shell.run_cell_magic("mpimap", "--no-wait early.pkl for x in range(4)", "x * 100 + 7\n")
    seen = [handle.partial()]
    handle.wait(30)
    seen.append(handle.partial())
    assert isinstance(handle._error, CodeChanged)
    assert seen == [{}, {}]


def test_live_never_draws_an_earlier_run_that_other_code_made(shell, mpi_cluster):
    """The same on a cluster, where the view follows the run directory: the earlier run's snapshot (started a
    moment before the submission) is not this run's, so --live reads nothing before the code-change question."""
    from conftest import CLUSTER_PROFILE
    from mpitasker_ext import CodeChanged

    on = f"--profile {CLUSTER_PROFILE}"
    shell.run_cell_magic("mpimap", f"{on} early.pkl for x in range(4)", "x + 1\n")
    drawn = []
    shell.user_ns["draw"] = lambda args, values: drawn.append(list(values))
    try:
        shell.run_cell_magic("mpimap", f"{on} --live draw early.pkl for x in range(4)", "x * 100 + 7\n")
    except CodeChanged:
        pass
    else:
        raise AssertionError("the changed code ran without --force or --reuse")
    assert drawn == []
