"""Files planted under a shared root must not run code in, or inject markup into, whoever reads progress.

Anyone who can write under a group-shared project directory can leave a run there: an output whose pickle runs
a command, a journal whose records do, a status file with HTML where numbers belong, a symlink to someone else's
run. The progress model, the CLI, the server API, the widget and the dashboard pages read all of these.
"""

import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import time

import pytest
from test_server import Server

from conftest import CHROMIUM, CHROMIUM_ARGS, REPO
from mpitasker_ext import journal, progress, rundir
from mpitasker_ext.payload import DamagedRecord, encode_value, read_value
from mpitasker_ext.scan import Location, journal_records, scan_journals
from mpitasker_ext.views import ProgressWidget

XSS = "<img src=x onerror=window.__pwned=1>"
NOW = time.time()


class _RunsCommand:
    """Unpickling this runs ``touch marker``: what a planted pickle can do in its reader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def evil_pickle(marker):
    return pickle.dumps(_RunsCommand(str(marker)))


def plant_output(root, name, marker):
    """A finished-looking run: a malicious output and a ``.code.json`` without a job count."""
    (root / name).write_bytes(evil_pickle(marker))
    (root / (name + rundir.META_SUFFIX)).write_text(json.dumps({"format": journal.FORMAT_VERSION, "code": "x"}))


def plant_journal(root, name, failed_marker, started_marker):
    """A stale-looking run (no status file): a journal whose failed and started records hold malicious pickles."""
    run_dir = root / (name + rundir.RUN_SUFFIX)
    run_dir.mkdir()
    data = (journal.JOURNAL_MAGIC_LINE % journal.FORMAT_VERSION
            + journal.encode_record(5, journal.STARTED, bytes(16), 0.0, evil_pickle(started_marker))
            + journal.encode_record(3, journal.FAILED, bytes(16), 0.0, evil_pickle(failed_marker)))
    (run_dir / "journal-r00001-planted.bin").write_bytes(data)


def plant_status(root, name, status):
    run_dir = root / (name + rundir.RUN_SUFFIX)
    run_dir.mkdir()
    (run_dir / rundir.STATUS).write_text(json.dumps(status))


# Markup where numbers belong. The old reader passed these through as they were (the fields chosen here did not
# make it raise), and the pages put them into innerHTML.
MARKUP_STATUS = {
    "state": "failed", "output": "/x/markup.pkl", "total": 4, "done": 2, "failed": 1, "rate": 1.5,
    "started": NOW - 10, "updated": NOW, "cached": XSS, "computed": XSS, "running": XSS, "pending": XSS,
    "ranks": {"1": {"current": [XSS, 1], "done": XSS, "failed": 0}, "2": {"current": [7, XSS], "done": 1}},
    "failures": [{"index": XSS, "error": "first"}, {"index": 2, "error": "second", "traceback": "tb"}],
}
# Markup in the fields every view does arithmetic with.
NUMBERS_STATUS = {"state": "running", "total": XSS, "done": XSS, "failed": True, "rate": "NaN",
                  "started": "yesterday", "updated": [1], "pid": "1", "host": 7, "ranks": [XSS],
                  "failures": [XSS, {"index": True, "error": "x"}, {"index": 1, "error": ["x"]}]}
FINE_STATUS = {"state": "failed", "total": 5, "done": 4, "failed": 1, "started": NOW - 5, "updated": NOW,
               "failures": [{"index": 3, "error": "boom-3", "traceback": "Traceback: boom-3"}]}
HASH_NAME = "a#b?c.pkl"
# Integers JSON allows but no float holds (every division by or of one raised OverflowError, and one such run made
# the listing of every run answer 500); the names of the runs in the root that are not text or hold a backslash.
HUGE_STATUS = {"state": "failed", "total": 3, "done": 10 ** 400, "failed": 10 ** 400, "rate": 1.0, "started": NOW - 5,
               "updated": NOW, "ranks": {"1": {"current": [10 ** 400, 10 ** 400], "done": 10 ** 400}},
               "failures": [{"index": 10 ** 400, "error": "huge"}]}
UNDECODABLE_DIR = os.fsdecode(b"caf\xe9")
BACKSLASH_NAME = "back\\slash.pkl"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One server over a root holding every kind of planted run, and the markers their pickles would create."""
    base = tmp_path_factory.mktemp("planted")
    root = base / "root"
    root.mkdir()
    markers = {name: base / f"ran-{name}" for name in ("output", "failed", "started")}
    plant_output(root, "evil.pkl", markers["output"])
    plant_journal(root, "journal.pkl", markers["failed"], markers["started"])
    plant_status(root, "markup.pkl", MARKUP_STATUS)
    plant_status(root, "numbers.pkl", NUMBERS_STATUS)
    plant_status(root, HASH_NAME, FINE_STATUS)
    plant_status(root, "huge.pkl", HUGE_STATUS)
    (root / UNDECODABLE_DIR).mkdir()
    plant_status(root / UNDECODABLE_DIR, "r.pkl", FINE_STATUS)
    (root / "back").mkdir()
    plant_status(root / "back", "slash.pkl", dict(FINE_STATUS, total=11, done=10))
    plant_status(root, BACKSLASH_NAME, dict(FINE_STATUS, total=22, done=21))
    outside = base / "outside"
    outside.mkdir()
    plant_status(outside, "secret.pkl", dict(FINE_STATUS, failures=[{"index": 1, "error": "SECRET-ERROR"}]))
    os.symlink(outside / "secret.pkl.mpi", root / "linked.pkl.mpi")
    (root / "meta.pkl").write_bytes(pickle.dumps(([(0, [0], 0)],)))       # a real output, its .code.json a link
    (outside / "meta.pkl.code.json").write_text(json.dumps({"njobs": 1, "status": dict(
        FINE_STATUS, total=1, failures=[{"index": 0, "error": "SECRET-META"}])}))
    os.symlink(outside / "meta.pkl.code.json", root / "meta.pkl.code.json")
    server = Server(root)
    yield server, root, markers
    server.stop()


def assert_no_marker(markers):
    ran = [name for name, path in markers.items() if path.exists()]
    assert not ran, f"reading progress unpickled planted bytes: {ran}"


# -- no unpickling --------------------------------------------------------------------------------------------------

def test_a_planted_output_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    plant_output(tmp_path, "evil.pkl", marker)
    p = progress.read_progress(tmp_path / "evil.pkl")
    assert p.state == "finished" and p.total == 0 and "unknown" in p.note
    cli = subprocess.run([sys.executable, "-m", "mpitasker_ext", "status", str(tmp_path / "evil.pkl")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert cli.returncode == 0 and "evil.pkl: finished" in cli.stdout
    assert not marker.exists()


def test_planted_journal_records_are_never_unpickled(tmp_path):
    markers = {"failed": tmp_path / "ran-failed", "started": tmp_path / "ran-started"}
    plant_journal(tmp_path, "j.pkl", markers["failed"], markers["started"])
    p = progress.read_progress(tmp_path / "j.pkl")
    assert p.state == "stale" and p.failed == 1
    assert [f.index for f in p.failures] == [3] and "unreadable" in p.failures[0].error
    cli = subprocess.run([sys.executable, "-m", "mpitasker_ext", "status", str(tmp_path / "j.pkl")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert cli.returncode == 0 and "failed job 3" in cli.stdout
    assert_no_marker(markers)


def test_the_server_api_never_unpickles(planted):
    server, _, markers = planted
    status, body = server.get("/mpitasker/api/runs")
    assert status == 200
    runs = {r["path"]: r for r in body["runs"]}
    assert runs["evil.pkl"]["state"] == "finished" and runs["evil.pkl"]["total"] == 0
    assert runs["journal.pkl"]["state"] == "stale" and runs["journal.pkl"]["failed"] == 1
    for path in ("evil.pkl", "journal.pkl"):
        status, _ = server.get(f"/mpitasker/api/run/{path}")
        assert status == 200
        server.get(f"/mpitasker/run/{path}", raw=True)
    assert_no_marker(markers)


# -- the journal format 2 payloads ------------------------------------------------------------------------------------

def test_failed_and_started_payloads_are_plain_data(tmp_path):
    run = rundir.RunDir(str(tmp_path / "out.pkl"))
    run.create()
    writer = run.new_journal(1)
    writer.start_batch([4, 5, 6])
    writer.append_value(4, bytes(16), 0.1, encode_value("four"))
    info = {"index": 5, "arg": "5", "error": "ValueError: <b>", "traceback": "Traceback ...\nValueError: <b>"}
    writer.append(5, False, bytes(16), 0.1, journal.encode_failure(info))
    writer.close()
    records = list(journal_records(writer.path))
    assert records[0].batch() == [4, 5, 6] and records[0].payload == (4).to_bytes(8, "little") + \
        (5).to_bytes(8, "little") + (6).to_bytes(8, "little")
    assert records[1].ok and records[1].payload == b""                 # an ok payload is never held by a reader
    assert records[2].failure() == info and json.loads(records[2].payload) == info
    ok = scan_journals([writer.path]).ok[bytes(16)]
    assert read_value(ok) == "four"
    failed = Location(writer.path, ok.offset + ok.length, os.path.getsize(writer.path) - ok.offset - ok.length)
    with pytest.raises(DamagedRecord, match="not a result record"):
        read_value(failed)                                              # only an ok record is ever unpickled
    assert [(index, info.rank) for index, info in run.interrupted_jobs()] == [(6, 1)]
    for payload in (b"\x80\x04K\x01.", b"\xff\xfe", b"[" * 100000, b'{"index": "5", "arg": "", "error": "", '
                    b'"traceback": ""}', b'{"index": 5, "arg": 1, "error": "", "traceback": ""}', b"null"):
        bad = journal.JobRecord(5, journal.FAILED, bytes(16), 0.0, payload).failure()
        assert bad == {"index": 5, "arg": "?", "error": "(failure record unreadable)", "traceback": ""}
    assert journal.JobRecord(5, journal.STARTED, bytes(16), 0.0, b"\x01\x02\x03").batch() == []


def test_a_jobs_output_is_read_without_touching_the_pickle_and_type_checked(tmp_path):
    """An ok record with output (kind 3) whose pickle runs a command: its output is read, its pickle never; a
    failed record whose output is not text reads as no output."""
    from mpitasker_ext import job_output

    marker = tmp_path / "ran-ok"
    run = rundir.RunDir(str(tmp_path / "out.pkl"))
    run.create()
    run.write_manifest(3, "code")
    writer = run.new_journal(1)
    evil = pickle.dumps(_RunsCommand(str(marker)))
    payload = journal.encode_output_prefix(f"printed {XSS}\n") + struct.pack("<IQ", 0, len(evil)) + evil
    writer.append(0, True, bytes(16), 0.1, b"")                     # kind 0 without output reads as ''
    with open(writer.path, "ab") as f:
        f.write(journal.encode_record(1, journal.OK_OUTPUT, bytes(16), 0.1, payload))
    for index, output in ((2, 5), (2, ["x"]), (2, {"a": 1})):
        info = {"index": index, "arg": "2", "error": "E", "traceback": "", "output": output}
        writer.append(index, False, b"\x02" * 16, 0.1, json.dumps(info).encode())
    writer.close()
    assert job_output(run.output, 1) == f"printed {XSS}\n" and job_output(run.output, 0) == ""
    assert job_output(run.output, 2) == ""
    [failed] = [r for r in journal_records(writer.path) if r.kind == journal.FAILED][-1:]
    assert "output" not in failed.failure()
    assert [f.output for f in progress.read_progress(run.output).failures] == [""]
    assert not marker.exists()


def test_a_format_1_journal_is_skipped_with_a_warning(tmp_path, caplog):
    run = rundir.RunDir(str(tmp_path / "out.pkl"))
    run.create()
    with open(run.path("journal-r00001-old.bin"), "wb") as f:
        f.write(b"MPITASKER-JOURNAL 1\n" + journal.encode_record(0, journal.OK, bytes(16), 0.0, pickle.dumps(1)))
    assert list(run.read_records()) == []
    assert f"not a format-{journal.FORMAT_VERSION} journal" in caplog.text


# -- markup where numbers belong ----------------------------------------------------------------------------------

def test_status_fields_are_type_checked():
    p = progress.from_status(NUMBERS_STATUS, now=NOW)
    assert (p.total, p.done, p.failed, p.rate, p.elapsed, p.started, p.updated, p.pid, p.host) == \
        (0, 0, 0, 0.0, 0.0, None, None, None, "")
    assert p.ranks == [] and p.failures == [] and p.fraction == 0.0
    m = progress.from_status(MARKUP_STATUS, now=NOW)
    assert (m.cached, m.computed, m.running, m.pending) == (0, 0, 0, 0)
    assert [(r.rank, r.current, r.batch, r.done) for r in m.ranks] == [(1, None, 0, 0), (2, None, 0, 1)]
    assert [(f.index, f.error) for f in m.failures] == [(2, "second")]
    for status in ({"ranks": {"x": {}, "1" * 50: {}, "²": {}}}, {"rate": float("inf")}, {"total": 10 ** 400},
                   {"rate": 10 ** 400}, {"failures": {"index": 1}}, {"started": NOW, "state": "failed"}, []):
        progress.from_status(status, now=NOW)             # never raises
    assert json.dumps(progress.from_status({"rate": float("nan")}).to_dict(), allow_nan=False)


def test_counts_beyond_what_a_float_holds_read_as_missing(planted):
    """Counts are bounded like JavaScript's safe integers: a larger one reads as missing (0), so no view divides
    by it and the listing of every run still answers."""
    from mpitasker_ext.views import bar_fractions
    p = progress.from_status(HUGE_STATUS, now=NOW)
    assert (p.total, p.done, p.failed, p.failures) == (3, 0, 0, [])
    assert [(r.rank, r.current, r.done) for r in p.ranks] == [(1, None, 0)]
    assert json.loads(json.dumps(p.to_dict()))["fraction"] == 0.0 and bar_fractions(p) == (0.0, 0.0)
    assert progress.from_status({"total": 2 ** 53 - 1, "done": 2 ** 53 - 1}).to_dict()["fraction"] == 1.0
    server, _, _ = planted
    status, body = server.get("/mpitasker/api/runs")
    assert status == 200, body
    assert {r["path"]: r["done"] for r in body["runs"]}["huge.pkl"] == 0
    assert server.get("/mpitasker/api/run/huge.pkl")[0] == 200


def test_a_run_whose_name_is_not_text_is_not_listed(planted):
    """A directory name that is not UTF-8 reached the API as a lone surrogate, on which the pages'
    encodeURIComponent throws: the dashboard showed no run at all ("URI malformed")."""
    server, _, _ = planted
    status, body = server.get("/mpitasker/api/runs")
    assert status == 200
    paths = [r["path"] for r in body["runs"]]
    assert HASH_NAME in paths and not any(UNDECODABLE_DIR in p for p in paths), paths
    for path in paths:
        path.encode("utf-8")


def test_a_backslash_is_part_of_a_run_name_here(planted):
    """On POSIX a backslash is a character of a name: the run named back\\slash.pkl is served, not back/slash.pkl."""
    server, _, _ = planted
    _, body = server.get("/mpitasker/api/runs")
    totals = {r["path"]: r["total"] for r in body["runs"]}
    assert totals[BACKSLASH_NAME] == 22 and totals["back/slash.pkl"] == 11
    status, run = server.get("/mpitasker/api/run/back%5Cslash.pkl")
    assert status == 200 and run["total"] == 22 and run["path"] == BACKSLASH_NAME
    status, run = server.get("/mpitasker/api/run/back/slash.pkl")
    assert status == 200 and run["total"] == 11


def test_deeply_nested_json_reads_as_damage(tmp_path):
    (tmp_path / "deep.pkl.mpi").mkdir()
    (tmp_path / "deep.pkl.mpi" / rundir.STATUS).write_text("[" * 100000)
    (tmp_path / "deep.pkl.mpi" / "journal-r00001-deep.bin").write_bytes(
        b"MPITASKER-JOURNAL %d " % journal.FORMAT_VERSION + b"[" * 4000 + b"\n")
    assert progress.read_progress(tmp_path / "deep.pkl").state == "stale"


def test_widget_html_has_no_planted_markup(tmp_path):
    widget = ProgressWidget("planted")
    for status in (MARKUP_STATUS, NUMBERS_STATUS):
        widget.update(progress.from_status(status, now=NOW))
        html = [widget.bar.value, widget.counts.value, widget.ranks.value] + [c.value for c in widget.failures.children]
        assert not any("<img" in h for h in html), html
    model = progress.from_status(MARKUP_STATUS, now=NOW)
    model.ranks[0].current = XSS                            # a model built by other code is escaped too
    from mpitasker_ext.views import _ranks_table
    assert "<img" not in _ranks_table(model)


def test_api_values_are_numbers(planted):
    server, _, _ = planted
    for path in ("markup.pkl", "numbers.pkl"):
        status, run = server.get(f"/mpitasker/api/run/{path}")
        assert status == 200
        for key in ("total", "done", "cached", "computed", "running", "failed", "pending"):
            assert type(run[key]) is int, (path, key, run[key])
        assert type(run["rate"]) is float and XSS not in json.dumps(run)
    _, body = server.get("/mpitasker/api/runs")
    assert XSS not in json.dumps(body)


# -- names with '#' and '?' ---------------------------------------------------------------------------------------

def test_a_run_named_with_hash_and_question_mark_is_served(planted):
    server, _, _ = planted
    status, run = server.get("/mpitasker/api/run/a%23b%3Fc.pkl")
    assert status == 200 and run["path"] == HASH_NAME and run["failures"][0]["error"] == "boom-3"
    status, page = server.get("/mpitasker/run/a%23b%3Fc.pkl", raw=True)
    assert status == 200 and "a#b?c.pkl" in page


# -- symlinks out of the root -----------------------------------------------------------------------------------

def test_symlinks_out_of_the_root_are_not_listed(planted):
    server, _, _ = planted
    status, body = server.get("/mpitasker/api/runs")
    assert status == 200
    paths = {r["path"] for r in body["runs"]}
    assert "linked.pkl" not in paths and "meta.pkl" not in paths and HASH_NAME in paths
    assert "SECRET" not in json.dumps(body)
    for path in ("linked.pkl", "meta.pkl"):
        status, text = server.get(f"/mpitasker/api/run/{path}")
        assert status == 404 and "SECRET" not in str(text)


def test_a_run_seen_earlier_is_dropped_once_it_leads_out_of_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    plant_status(root, "moved.pkl", FINE_STATUS)
    plant_status(outside, "theirs.pkl", dict(FINE_STATUS, failures=[{"index": 1, "error": "SECRET-SEEN"}]))
    server = Server(root)
    try:
        _, body = server.get("/mpitasker/api/runs")
        assert [r["path"] for r in body["runs"]] == ["moved.pkl"]      # now remembered
        for name in os.listdir(root / "moved.pkl.mpi"):
            os.unlink(root / "moved.pkl.mpi" / name)
        os.rmdir(root / "moved.pkl.mpi")
        os.symlink(outside / "theirs.pkl.mpi", root / "moved.pkl.mpi")
        time.sleep(1.2)                                                  # past the walk's reuse
        _, body = server.get("/mpitasker/api/runs")
        assert body["runs"] == [] and "SECRET" not in json.dumps(body)
        os.unlink(root / "moved.pkl.mpi")
        (outside / "output.pkl").write_bytes(pickle.dumps(([(0, [0], 0)],)))
        os.symlink(outside / "output.pkl", root / "moved.pkl")          # a bare output: only the memory lists it
        time.sleep(1.2)
        _, body = server.get("/mpitasker/api/runs")
        assert body["runs"] == []
    finally:
        server.stop()


# -- a real browser -------------------------------------------------------------------------------------------------

def test_pages_run_no_planted_script_and_link_odd_names(planted):
    from playwright.sync_api import sync_playwright
    server, _, markers = planted
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the test command installs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{server.base}/mpitasker/?token={server.token}")
        page.wait_for_selector("tr.run[data-path='markup.pkl']")
        rows = page.locator("tr.run").evaluate_all("rows => rows.map(r => r.dataset.path)")
        assert {"markup.pkl", "numbers.pkl", HASH_NAME} <= set(rows) and "linked.pkl" not in rows
        time.sleep(1.5)                                   # an <img src=x> fails and fires onerror meanwhile
        assert page.evaluate("window.__pwned") is None
        assert page.locator("img").count() == 0
        for path in ("markup.pkl", "numbers.pkl"):
            page.goto(f"{server.base}/mpitasker/run/{path}?token={server.token}")
            page.wait_for_selector("span.counts")
            time.sleep(1.5)
            assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0, path
        page.goto(f"{server.base}/mpitasker/?token={server.token}")
        page.locator(f"tr.run[data-path='{HASH_NAME}'] a").click()
        page.wait_for_selector("details.failure summary")
        assert "boom-3" in page.locator("details.failure summary").first.inner_text()
        assert page.url.split("?")[0].endswith("/mpitasker/run/a%23b%3Fc.pkl")
        browser.close()
    assert_no_marker(markers)


def test_files_inside_a_run_directory_that_lead_elsewhere_or_block_are_not_read(tmp_path):
    """A real .mpi directory whose status.json or journal is a symlink out of the root, or a FIFO: readers refuse
    them (no secret served, no reader blocked)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    plant_status(outside, "other.pkl", dict(FINE_STATUS, failures=[{"index": 1, "error": "SECRET-STATUS"}]))
    plant_journal(outside, "other2.pkl", tmp_path / "m1", tmp_path / "m2")
    linked = root / "x.pkl.mpi"
    linked.mkdir()
    os.symlink(outside / "other.pkl.mpi" / rundir.STATUS, linked / rundir.STATUS)
    os.symlink(outside / "other2.pkl.mpi" / "journal-r00001-planted.bin", linked / "journal-r00001-aaaa.bin")
    blocking = root / "y.pkl.mpi"
    blocking.mkdir()
    os.mkfifo(blocking / rundir.STATUS)
    started = time.monotonic()
    for name in ("x.pkl", "y.pkl"):
        snapshot = progress.read_progress(root / name)
        assert "SECRET" not in json.dumps(snapshot.to_dict()) and snapshot.failures == []
    proc = subprocess.run([sys.executable, "-m", "mpitasker_ext", "status", str(root / "y.pkl")], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=30)
    assert proc.returncode in (0, 1) and time.monotonic() - started < 20
