"""The progress model against real runs, its text renderings, the CLI, %mpistatus and the widget view."""

import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from mpitasker_ext import identity, journal, rundir
from mpitasker_ext import progress as pm
from mpitasker_ext import status as sm
from mpitasker_ext.views import ProgressWidget, TextProgress

PAUSING_JOB = """
    import os, sys, time
    from mpitasker_ext import Tasker
    def work(x):
        if x >= 20:
            while not os.path.exists('go'):
                time.sleep(0.02)
        if x == 45:
            raise ValueError('job 45 is bad')
        with open('exec.log', 'a') as f:
            f.write(f'{x}\\n')
        return x
    with Tasker(chunksize=1) as tsk:
        tsk.map('out.pkl', work, range(60))
"""


def wait_for(predicate, timeout=60, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def test_model_counts_at_a_paused_moment_and_at_the_end(runner):
    runner.write("job.py", PAUSING_JOB)
    proc = runner.start("job.py", 3)
    out = runner.path("out.pkl")
    paused = wait_for(lambda: (p := pm.read_progress(out)).done == 20 and p.running == 2 and p)
    assert paused.state == "running" and paused.total == 60 and paused.failed == 0
    assert paused.pending == 60 - 20 - 2 and paused.cached == 0 and paused.computed == 20
    currents = sorted(r.current for r in paused.ranks)       # a short-job batch may be queued behind the first
    assert len(set(currents)) == 2 and currents[0] >= 20 and currents[1] <= 23
    assert sum(r.done for r in paused.ranks) == 20
    assert paused.eta is not None and paused.rate > 0
    open(runner.path("go"), "w").close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0                      # job 45 failed
    final = pm.read_progress(out)
    assert final.state == "failed" and final.done == 59 and final.failed == 1 and final.running == 0
    assert final.failures[0].index == 45 and "job 45 is bad" in final.failures[0].traceback
    assert final.failures[0].rank in (1, 2) and final.failures[0].host == socket.gethostname()
    assert "out.pkl: failed | 59/60 done | 1 failed" in err
    os.remove(runner.path("go"))


def test_killed_run_reads_as_stale_with_counts_from_the_journals(runner):
    runner.write("job.py", PAUSING_JOB)
    proc = runner.start("job.py", 3)
    out = runner.path("out.pkl")
    wait_for(lambda: pm.read_progress(out).done == 20)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = wait_for(lambda: (p := pm.read_progress(out)).state == "stale" and p, timeout=20)
    assert stale.done == 20 and stale.running == 0 and stale.total == 60 and stale.pending == 40
    assert "stopped updating" in stale.note
    text = subprocess.run([sys.executable, "-m", "mpitasker_ext", "status", out], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=30).stdout
    assert "out.pkl: stale | 20/60 done" in text and "stopped updating" in text


def test_finished_and_missing_runs(tmp_path, monkeypatch):
    from mpitasker_ext import mpimap
    monkeypatch.chdir(tmp_path)
    mpimap(abs, range(-5, 5), str(tmp_path / "done.pkl"), progress=False)
    finished = pm.read_progress(tmp_path / "done.pkl")
    assert finished.state == "finished" and finished.total == finished.done == 10
    missing = pm.read_progress(tmp_path / "nothing.pkl")
    assert missing.state == "missing" and "no run at" in missing.note
    proc = subprocess.run([sys.executable, "-m", "mpitasker_ext", "status", str(tmp_path / "nothing.pkl")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert proc.returncode == 1 and "no run at" in proc.stdout


def sample_status(**over):
    status = {"state": "running", "output": "/x/sweep.pkl", "total": 100, "done": 40, "cached": 10,
              "computed": 30, "failed": 2, "running": 3, "pending": 55, "rate": 5.0, "started": 1000.0,
              "updated": 1010.0, "host": "h", "pid": 1, "workers": 3,
              "ranks": {"1": {"current": [41, 1], "done": 10, "failed": 1},
                        "2": {"current": [50, 4], "done": 20, "failed": 1}, "3": {"current": None, "done": 0,
                                                                                   "failed": 0}},
              "failures": [{"index": 7, "error": "ValueError: bad 7", "traceback": "Traceback ...\nValueError"}]}
    status.update(over)
    return status


def test_text_rendering():
    p = pm.from_status(sample_status(), now=1012.0)
    assert p.elapsed == 12.0 and p.eta == pytest.approx((100 - 40 - 2) / 5.0)
    assert pm.summary_line(p) == ("sweep.pkl: running | 40/100 done (10 cached) | 2 failed | 3 running | "
                                  "5.0 jobs/s | elapsed 0:00:12 | ETA 0:00:11")
    text = pm.render_text(p)
    assert "     1           41    10       1" in text and "50 (+3)" in text
    assert "failed job 7: ValueError: bad 7" in text
    done = pm.from_status(sample_status(state="failed"), now=5000.0)
    assert pm.summary_line(done) == "sweep.pkl: failed | 40/100 done (10 cached) | 2 failed | took 0:00:10"


def test_the_status_file_has_one_format_written_and_read_by_the_status_module():
    status = sm.RunStatus.from_json(sample_status())
    assert status.ranks[1] == sm.RankState(2, 50, 4, 20, 1) and status.failures[0].rank is None
    assert sm.RunStatus.from_json(status.to_json()) == status
    written = status.to_json()
    assert list(written) == ["format", "state", "output", "total", "done", "cached", "computed", "failed", "running",
                             "pending", "rate", "started", "updated", "host", "pid", "workers", "ranks", "failures"]
    assert written["ranks"] == sample_status()["ranks"]
    assert written["failures"] == [dict(sample_status()["failures"][0], rank=None, host="", output="")]
    with pytest.raises(ValueError):
        sm.RunStatus("done")                          # a writer names one of the states
    assert set(sm.STATES) == {"running", "finished", "failed", "error", "interrupted", "stale", "missing"}


def test_error_is_a_state_and_an_unknown_state_reads_as_missing():
    assert pm.from_status(sample_status(state="error"), now=5000.0).state == sm.ERROR
    assert pm.from_status(sample_status(state="<b>paused</b>"), now=1012.0).state == sm.RUNNING


def test_failures_say_where_the_job_ran_and_older_ones_do_not():
    placed = {"index": 7, "error": "ValueError: bad 7", "traceback": "Traceback ...", "rank": 2, "host": "node7"}
    p = pm.from_status(sample_status(failures=[placed]), now=1012.0)
    assert (p.failures[0].rank, p.failures[0].host) == (2, "node7")
    assert "failed job 7 (rank 2 on node7): ValueError: bad 7" in pm.render_text(p)
    assert p.to_dict()["failures"] == [dict(placed, output="")]   # the server's JSON API carries them too
    for rank, host in ((True, 5), ("2", None), (None, ["x"])):
        odd = pm.from_status(sample_status(failures=[dict(placed, rank=rank, host=host)]), now=1012.0)
        assert (odd.failures[0].rank, odd.failures[0].host) == (None, "")
        assert "failed job 7: ValueError: bad 7" in pm.render_text(odd)


def test_a_failed_jobs_output_is_shown_with_it_and_type_checked():
    printed = "".join(f"line {i}\n" for i in range(10)) + "x" * 5000
    failure = {"index": 7, "error": "ValueError: bad 7", "traceback": "Traceback ...", "output": printed}
    p = pm.from_status(sample_status(failures=[failure]), now=1012.0)
    assert p.failures[0].output == printed[-sm.MAX_FAILURE_OUTPUT:]      # the end, where the error usually is
    assert p.to_dict()["failures"][0]["output"] == printed[-sm.MAX_FAILURE_OUTPUT:]
    short = pm.from_status(sample_status(failures=[dict(failure, output="starting\nstep 1\nstep 2\n")]))
    text = pm.render_text(short)
    assert "failed job 7: ValueError: bad 7\n    output of job 7 (last lines):\n    | starting\n" in text
    assert text.endswith("    | step 2")
    for odd in (5, ["x"], {"a": 1}, None):
        planted = pm.from_status(sample_status(failures=[dict(failure, output=odd)]), now=1012.0)
        assert planted.failures[0].output == "" and "output of job" not in pm.render_text(planted)


def test_a_stale_run_reads_where_its_jobs_failed_from_the_journals(tmp_path):
    run = rundir.RunDir(str(tmp_path / "out.pkl"))
    run.create()
    writer = run.new_journal(2)
    placed = {"index": 3, "arg": "3", "error": "ValueError: three", "traceback": "Traceback ...", "rank": 2,
              "host": "node7"}
    writer.append(3, False, identity.args_digest(3), 0.1, journal.encode_failure(placed))
    older = {key: placed[key] for key in journal.FAILURE_FIELDS}   # written before records said where
    writer.append(4, False, identity.args_digest(4), 0.1, journal.encode_failure(dict(older, index=4)))
    writer.close()
    p = pm.read_progress(tmp_path / "out.pkl")
    assert p.state == "stale" and [(f.index, f.rank, f.host) for f in p.failures] == [(3, 2, "node7"), (4, None, "")]
    text = pm.render_text(p)
    assert "failed job 3 (rank 2 on node7): ValueError: three" in text and "failed job 4: ValueError" in text


def test_text_view_draws_one_line_on_a_tty_and_rare_lines_in_a_log():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty, log = Tty(), io.StringIO()
    p = pm.from_status(sample_status(), now=1012.0)
    tty_view, log_view = TextProgress(tty), TextProgress(log, every=30)
    for _ in range(50):
        tty_view.update(p)
        log_view.update(p)
    assert tty.getvalue().count("\n") == 0 and tty.getvalue().count("\r") == 50
    assert log.getvalue().count("\n") == 1
    log_view.close(p)
    assert "rank  current job" in log.getvalue()


def test_widget_view_renders_the_model():
    widget = ProgressWidget("sweep")
    widget.update(pm.from_status(sample_status(), now=1012.0))
    assert "40/100" in widget.counts.value and "data-total='100'" in widget.counts.value
    assert "data-fraction='0.400000'" in widget.bar.value and "data-fraction='0.020000'" in widget.bar.value
    assert "<td>41</td>" in widget.ranks.value and len(widget.failures.children) == 1
    assert widget.failures.get_title(0).startswith("job 7: ValueError")
    widget.update(pm.from_status(sample_status(failures=[{"index": 1, "error": "<b>x</b>", "traceback": "<t>"}])))
    assert "&lt;t&gt;" in widget.failures.children[0].value
    assert "output of job" not in widget.failures.children[0].value
    printed = {"index": 1, "error": "E", "traceback": "<t>", "output": "step <script>alert(1)</script>\n"}
    widget.update(pm.from_status(sample_status(failures=[printed])))
    entry = widget.failures.children[0].value
    assert "output of job 1 (last lines):" in entry and "<script>" not in entry
    assert entry.index("&lt;t&gt;") < entry.index("step &lt;script&gt;alert(1)&lt;/script&gt;")


def test_mpistatus_magic_shows_any_run_directory(runner, capsys):
    from IPython.core.interactiveshell import InteractiveShell
    runner.write("job.py", PAUSING_JOB)
    proc = runner.start("job.py", 3)
    out = runner.path("out.pkl")
    wait_for(lambda: pm.read_progress(out).done == 20)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "mpitasker_ext")
    follower = ip.run_line_magic("mpistatus", out)
    assert follower is None
    time.sleep(0.3)
    open(runner.path("go"), "w").close()
    proc.communicate(timeout=120)
    seen = []
    wait_for(lambda: seen.append(capsys.readouterr().err) or "out.pkl: failed" in "".join(seen), timeout=10)
    assert "out.pkl: running | 20/60 done" in "".join(seen)
    assert "out.pkl: failed | 59/60 done | 1 failed" in "".join(seen)


def test_script_mode_progress_goes_to_rank0_stderr_without_per_job_lines(runner):
    runner.write("job.py", """
        from mpitasker_ext import mpimap
        mpimap(lambda x: x, range(500), 'quiet.pkl')
    """)
    proc = runner.run("job.py", 4)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any("quiet.pkl: finished | 500/500 done" in line for line in lines)
    assert len(lines) < 10, lines
