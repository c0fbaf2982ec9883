"""A job's printed output, against real runs: echoed under mpiexec, kept with its record (ok and failed), shown
with failures, read back from the run directory and from the store, bounded per job."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from mpitasker_ext import job_output, journal, load, mpimap, rundir
from mpitasker_ext import progress as pm
from mpitasker_ext.capture import MAX_OUTPUT
from mpitasker_ext.errors import JobsFailed, UsageError
from mpitasker_ext.results import Results
from mpitasker_ext.scan import journal_records
from mpitasker_ext.store import ResultStore

TALKING_JOB = """
    import json, os, sys
    from mpitasker_ext import Tasker, JobsFailed
    def work(x):
        if x:                                      # job 0 prints nothing
            print(f'job {x} starts')
            print(f'job {x} warns', file=sys.stderr)
        if x == 7 and not os.path.exists('fixed'):
            print('about to fail')
            raise ValueError('seven')
        return x * 2
    with Tasker() as tsk:
        try:
            tsk.map('out.pkl', work, range(12))
        except JobsFailed as exc:
            if tsk.rank == 0:
                print('FAILURES', json.dumps(exc.failures), flush=True)
                print('MESSAGE', json.dumps(str(exc)), flush=True)
            raise
"""


def said(stdout, tag):
    [line] = [line for line in stdout.splitlines() if line.startswith(tag + " ")]
    return json.loads(line.split(" ", 1)[1])


def test_script_output_is_echoed_kept_with_each_record_and_shown_with_failures(runner):
    runner.write("job.py", TALKING_JOB)
    first = runner.run("job.py", 3, check=False)
    out = runner.path("out.pkl")
    assert first.returncode != 0
    for x in range(1, 12):                         # under mpiexec the ranks' stdout/stderr still show it
        assert f"job {x} starts" in first.stdout and f"job {x} warns" in first.stderr
    printed_7 = "job 7 starts\njob 7 warns\nabout to fail\n"
    message = said(first.stdout, "MESSAGE")
    assert f"ValueError: seven\noutput of job 7 (last lines):\n{printed_7}The 11 finished" in message
    assert said(first.stdout, "FAILURES")["7"].endswith(f"\noutput of job 7:\n{printed_7}")

    # read back while the run directory holds the failed run: ok records (kind 3) and the failed one
    assert job_output(out, 7) == printed_7
    assert job_output(out, 3) == "job 3 starts\njob 3 warns\n"
    assert job_output(out, 0) == ""
    kinds = {r.index: r.kind for r in rundir.RunDir(out).read_records()}
    assert kinds[0] == journal.OK and kinds[3] == journal.OK_OUTPUT and kinds[7] == journal.FAILED
    with pytest.raises(UsageError, match="out of range.*12 jobs"):
        job_output(out, 12)
    status = json.loads(open(runner.path("out.pkl.mpi", rundir.STATUS)).read())
    assert status["failures"][0]["output"] == printed_7
    shown = pm.read_progress(out)
    assert shown.failures[0].output == printed_7
    assert "output of job 7 (last lines):\n    | job 7 starts" in pm.render_text(shown)
    cli = subprocess.run([sys.executable, "-m", "mpitasker_ext", "status", out, "--job", "7"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert cli.returncode == 0 and cli.stdout == printed_7

    # fixed and rerun: only job 7 runs again; every output is now read through the store's index
    open(runner.path("fixed"), "w").close()
    runner.run("job.py", 3)
    assert not os.path.exists(runner.path("out.pkl.mpi"))
    assert job_output(out, 7) == "job 7 starts\njob 7 warns\n"
    assert [job_output(out, x) for x in (0, 5)] == ["", "job 5 starts\njob 5 warns\n"]  # kept from the 1st run
    results = Results(out, kind="values")
    assert results.output(-1) == "job 11 starts\njob 11 warns\n" and list(results) == [2 * x for x in range(12)]
    assert [v for _, _, v in load(out)] == [2 * x for x in range(12)]


def test_a_job_printing_a_megabyte_keeps_its_last_64_kib_marked_as_cut(tmp_path, capsys):
    def chatty(x):
        for i in range(20_000):                   # 20,000 lines of 50 characters: 1 MB
            print(f"{x}:{i:08d} " + "." * 38)
        return x

    out = str(tmp_path / "big.pkl")
    assert list(mpimap(chatty, range(2), out, progress=False)) == [0, 1]
    assert capsys.readouterr().out.count("\n") == 40_000   # echoed in full, as a script's stdout
    text = job_output(out, 1)
    cut = 20_000 * 50 - len(text.split("\n", 1)[1])
    assert text.startswith(f"[... {cut} earlier characters cut ...]\n1:") and cut > 0
    assert text.endswith("1:00019999 " + "." * 38 + "\n")
    assert MAX_OUTPUT - 1024 < len(text.split("\n", 1)[1]) <= MAX_OUTPUT


def test_output_records_survive_adoption_and_compaction_with_values_unchanged(tmp_path, capsys):
    out = str(tmp_path / "keep.pkl")

    def job(x):
        if x % 2:
            print(f"odd {x}")
        return {"x": x, "square": x * x}

    expected = [{"x": x, "square": x * x} for x in range(8)]
    assert list(mpimap(job, range(8), out, progress=False)) == expected
    assert capsys.readouterr().out == "odd 1\nodd 3\nodd 5\nodd 7\n"
    store = ResultStore(out)
    kinds = {r.index: r.kind for path in store.journal_paths() for r in journal_records(path) if r.ok}
    assert {i for i, k in kinds.items() if k == journal.OK_OUTPUT} == {1, 3, 5, 7}
    assert list(load(out, kind="values")) == expected
    # a narrower grid with prune: the kept frames (kind 3 included) are copied into one new journal
    assert list(mpimap(job, [3, 4, 5], out, prune=True, progress=False)) == [expected[3], expected[4], expected[5]]
    [compacted] = store.journal_paths()
    assert "journal-c-" in compacted
    assert sorted(r.kind for r in journal_records(compacted)) == [journal.OK, journal.OK_OUTPUT, journal.OK_OUTPUT]
    assert [job_output(out, i) for i in range(3)] == ["odd 3\n", "", "odd 5\n"]
    assert list(Results(out, kind="values")) == [expected[3], expected[4], expected[5]]
    assert capsys.readouterr().out == ""                  # nothing was computed again


def test_only_the_current_runs_journals_count(tmp_path):
    """A journal of an earlier run left in the run directory may be of another grid: its job 2 is another job."""
    out = str(tmp_path / "grid.pkl")
    run = rundir.RunDir(out)
    run.create()
    old = {"rank": 1, "pid": 1, "host": "h", "started": time.time() - 3600, "code": None}
    failed = journal.encode_failure({"index": 2, "arg": "2", "error": "E", "traceback": "", "output": "old grid\n"})
    with open(os.path.join(run.run_dir, "journal-r00001-old.bin"), "wb") as f:
        f.write(b"MPITASKER-JOURNAL 3 " + json.dumps(old).encode() + b"\n"
                + journal.encode_record(2, journal.FAILED, bytes(16), 0.1, failed))
    run.write_manifest(5, "code")
    with pytest.raises(UsageError, match="job 2 of .* has not finished in the current run"):
        job_output(out, 2)
    writer = run.new_journal(1)
    writer.append(2, False, bytes(16), 0.1, journal.encode_failure(
        {"index": 2, "arg": "2", "error": "E", "traceback": "", "output": "this grid\n"}))
    writer.close()
    assert job_output(out, 2) == "this grid\n"
    with pytest.raises(UsageError, match="out of range"):
        job_output(out, 5)
    with pytest.raises(UsageError, match="no run of .*nothing.pkl yet"):
        job_output(str(tmp_path / "nothing.pkl"), 0)


STREAM_JOB = """
    import faulthandler, os, sys
    from mpitasker_ext import Tasker, job_output
    def work(x):
        print(f'text {x}')
        if x == 0:
            sys.stdout.buffer.write(b'bytes 0\\n')
            sys.stdout.flush()
        elif x == 1:
            os.write(sys.stdout.fileno(), b'fd 1\\n')
        elif x == 2:
            faulthandler.enable()             # asks sys.stderr for its file descriptor
            faulthandler.disable()
        elif x == 3:
            sys.stdout.reconfigure(line_buffering=True)
        return x
    with Tasker() as tsk:
        data = tsk.map('out.pkl', work, range(4))
    if tsk.rank == 0:
        print('RESULTS', [v for _i, _a, v in data], [job_output('out.pkl', x) for x in range(4)], flush=True)
"""


def test_jobs_that_use_the_streams_buffer_or_descriptor_still_run(runner):
    """Captured streams are the original ones for whatever the capture does not handle itself: bytes through
    sys.stdout.buffer and writes to the descriptor go where they went before, uncaptured; no job breaks."""
    runner.write("job.py", STREAM_JOB)
    done = runner.run("job.py", 3)
    assert "bytes 0\n" in done.stdout and "fd 1\n" in done.stdout
    assert "RESULTS [0, 1, 2, 3] ['text 0\\n', 'text 1\\n', 'text 2\\n', 'text 3\\n']" in done.stdout


def test_an_earlier_grid_run_a_moment_before_is_not_the_current_run(tmp_path):
    """Journals of a run of another grid, started a moment before the current run (well within the slack kept
    for other hosts' clocks), hold another argument under the same job number: on the host that wrote the
    manifest, only journals started after it count."""
    out = str(tmp_path / "grids.pkl")

    def job(x):
        print("arg", x)
        if x >= 10:
            raise ValueError(x)
        return x

    mpimap(job, [5], out, progress=False)                 # arg 5 in the store
    for grid in ([10, 11], [5, 30]):                       # the second grid's job 0 (arg 5) comes from the store
        with pytest.raises(JobsFailed):
            mpimap(job, grid, out, progress=False)
    assert job_output(out, 1) == "arg 30\n"
    with pytest.raises(UsageError, match="job 0 of .* has not finished in the current run"):
        job_output(out, 0)                                 # not grid [10, 11]'s job 0, which printed "arg 10"


def test_the_status_file_stays_small_whatever_failing_jobs_print_or_say(tmp_path):
    """40 failed jobs, each printing 64 KiB and raising a 100,000-character message: the status lists 20, each
    with its output, traceback and error line cut, so every status write stays small."""
    out = str(tmp_path / "loud.pkl")

    def job(x):
        print(("." * 99 + "\n") * 700)
        raise ValueError(f"{x} " + "x" * 100_000)

    with pytest.raises(JobsFailed) as info:
        mpimap(job, range(40), out, progress=False)
    status = os.path.join(out + ".mpi", rundir.STATUS)
    assert os.path.getsize(status) < 20 * 12_000            # each: 4,000 + 4,000 + 1,000 characters and JSON
    first = json.loads(open(status).read())["failures"][0]
    assert first["error"].startswith("ValueError: 0 xxx") and first["error"].endswith("characters cut]")
    assert len(str(info.value)) < 100_000


def test_undecodable_text_a_failed_job_printed_reads_back_escaped_everywhere(shell, tmp_path):
    """A file name that is not UTF-8 prints as lone surrogates; kept escaped, as an ok record keeps it, so the
    CLI under a UTF-8 locale and every view can show it (the CLI stopped with UnicodeEncodeError)."""
    with pytest.raises(JobsFailed):
        shell.run_cell_magic("mpimap", "names.pkl for x in range(2)",
                             "print('file', b'caf\\xe9'.decode('utf-8', 'surrogateescape'))\n"
                             "if x:\n    raise ValueError(x)\nx\n")
    out = str(tmp_path / "names.pkl")
    assert job_output(out, 0) == job_output(out, 1) == "file caf\\udce9\n"
    env = dict(os.environ, PYTHONPATH=REPO, LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8")
    for argv in (["--job", "1"], []):
        cli = subprocess.run([sys.executable, "-m", "mpitasker_ext", "status", out, *argv], capture_output=True,
                             env=env, timeout=60)
        assert cli.returncode == 0 and b"file caf\\udce9" in cli.stdout, cli.stderr.decode()
