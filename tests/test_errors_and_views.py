"""Pure logic of the front end: an error crosses ranks and engines by name and comes back whole; the monitor
redraws at a bounded rate; the bar keeps failures in proportion. (Real runs: test_magics, test_notebooks.)"""

import pickle

import pytest

from mpitasker_ext import errors, progress, store
from mpitasker_ext.follow import StatusMonitor
from mpitasker_ext.sweep import Outcome
from mpitasker_ext.views import bar_fractions


def package_errors():
    found, pending = [], [errors.MPITaskerError]
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return [k for k in found if k.__module__.startswith("mpitasker_ext")]


def test_every_package_error_comes_back_as_its_own_class():
    kinds = package_errors()
    names = {k.__name__ for k in kinds}
    assert {"ClusterError", "EnginesDied", "ClosureError", "DamagedRecord", "RunLocked", "JobsFailed"} <= names
    assert store.DamagedRecord in kinds                      # defined outside errors.py, found all the same
    for kind in kinds:
        outcome = Outcome(error_type=kind.__name__, message=f"what went wrong in {kind.__name__}")
        with pytest.raises(kind) as info:
            pickle.loads(pickle.dumps(outcome)).raise_error(on_root=True)
        assert type(info.value) is kind and str(info.value) == f"what went wrong in {kind.__name__}"
        assert info.value._render_traceback_()[0] == f"{kind.__name__}: what went wrong in {kind.__name__}"


def test_unknown_names_and_foreign_exceptions_become_the_base_class():
    with pytest.raises(errors.MPITaskerError) as info:
        Outcome(error_type="ValueError", message="m").raise_error(on_root=True)
    assert type(info.value) is errors.MPITaskerError
    outcome = Outcome.from_exception(OSError("disk gone"))
    assert outcome.error_type == "MPITaskerError" and "disk gone" in outcome.message


def test_jobs_failed_keeps_failures_and_total_on_every_rank():
    sent = errors.JobsFailed("3 of 180 jobs failed: indices 5, 60, 120\nTraceback ...", {5: "tb5", 60: "tb60",
                                                                                          120: "tb120"}, total=180)
    outcome = pickle.loads(pickle.dumps(Outcome.from_exception(sent)))
    with pytest.raises(errors.JobsFailed) as root:
        outcome.raise_error(on_root=True)
    assert root.value.total == 180 and root.value.indices == [5, 60, 120] and str(root.value) == str(sent)
    with pytest.raises(errors.JobsFailed) as worker:
        outcome.raise_error(on_root=False)
    assert worker.value.total == 180 and str(worker.value) == ("3 of 180 jobs failed: indices 5, 60, 120 (rank 0 "
                                                               "shows the traceback)")


class Recorder:
    def __init__(self):
        self.calls = []

    def update(self, p):
        self.calls.append(("update", p.done))

    def close(self, p):
        self.calls.append(("close", p.state))


def test_status_monitor_redraws_at_most_every_min_interval_and_always_closes():
    view = Recorder()
    monitor = StatusMonitor(view, min_interval=3600)
    for done in range(5):
        monitor({"state": "running", "total": 10, "done": done})
    monitor({"state": "finished", "total": 10, "done": 10})
    assert view.calls == [("update", 0), ("close", "finished")]
    eager = Recorder()
    monitor = StatusMonitor(eager, min_interval=0)
    for done in range(3):
        monitor({"state": "running", "total": 10, "done": done})
    assert eager.calls == [("update", 0), ("update", 1), ("update", 2)]


@pytest.mark.parametrize("state, total, done, failed, expected", [
    ("failed", 180, 177, 3, (177 / 180, 3 / 180)),
    ("running", 100, 40, 2, (0.4, 0.02)),
    ("finished", 0, 0, 0, (1.0, 0.0)),           # an output without a job count: done, not empty
    ("running", 0, 0, 0, (0.0, 0.0)),
    ("running", 10, 12, 5, (1.0, 0.0)),          # counts beyond the total (a planted file) stay in the bar
])
def test_bar_keeps_done_and_failed_in_proportion(state, total, done, failed, expected):
    model = progress.Progress(output="x.pkl", state=state, total=total, done=done, failed=failed)
    assert bar_fractions(model) == pytest.approx(expected)


def test_the_run_link_keeps_any_path_in_its_attributes_and_never_raises():
    """The widget's "open run" link: quotes and markup in the output path stay inside its attributes; a path of
    undecodable bytes (the server lists no such run) gets no link instead of a UnicodeEncodeError that stopped
    the cell before it ran."""
    import os
    from html.parser import HTMLParser

    from mpitasker_ext.views import ProgressWidget, run_link_html

    class Links(HTMLParser):
        found = []

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, dict(attrs)))

    odd = "/tmp/a'b<img src=x>\"c&d #?.pkl"
    parser = Links()
    parser.feed(run_link_html(odd))
    [(tag, attrs)] = parser.found
    assert tag == "a" and attrs["data-mpitasker-run"] == odd
    assert attrs["href"] == "/mpitasker/open?path=%2Ftmp%2Fa%27b%3Cimg+src%3Dx%3E%22c%26d+%23%3F.pkl"
    undecodable = os.fsdecode(b"/tmp/caf\xe9/a.pkl")
    assert run_link_html(undecodable) == ""
    assert "open run" not in ProgressWidget("x", output=undecodable).title.value
