"""The run directory and its journals: framing, damage handling, atomic writes, locks, identities. No MPI."""

import json
import logging
import os
import pickle
import subprocess
import sys

import pytest

from conftest import REPO
from mpitasker_ext import files, identity, results, rundir
from mpitasker_ext.errors import RunLocked, UsageError
from mpitasker_ext.payload import encode_value, read_value
from mpitasker_ext.scan import scan_journals


def write_journal(run, records):
    w = run.new_journal(1)
    for index, value in records:
        w.append_value(index, identity.args_digest(index), 0.01, encode_value(value))
    w.close()
    return w.path


def stored_values(run, records):
    """The value each record names, read where the scan found it."""
    scan = scan_journals(run.journal_paths())
    return [read_value(scan.ok[r.digest]) for r in records]


@pytest.fixture
def run(tmp_path):
    r = rundir.RunDir(str(tmp_path / "out.pkl"))
    r.create()
    return r


def test_records_round_trip(run):
    write_journal(run, [(i, i * i) for i in range(100)])
    recs = list(run.read_records())
    assert [r.index for r in recs] == list(range(100))
    assert stored_values(run, recs) == [i * i for i in range(100)]
    assert all(r.ok and r.digest == identity.args_digest(r.index) and r.payload == b"" for r in recs)


def test_torn_tail_drops_only_the_last_record(run, caplog):
    path = write_journal(run, [(i, i) for i in range(10)])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 5)
    with caplog.at_level(logging.WARNING):
        recs = list(run.read_records())
    assert [r.index for r in recs] == list(range(9))
    assert "torn tail" in caplog.text and os.path.basename(path) in caplog.text


def test_flipped_byte_in_the_middle_loses_one_record_only(run, caplog):
    path = write_journal(run, [(i, "x" * 50) for i in range(10)])
    hit = scan_journals([path]).ok[identity.args_digest(5)]
    data = bytearray(open(path, "rb").read())
    data[hit.offset + hit.length - 10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING):
        recs = list(run.read_records())
    assert [r.index for r in recs] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert stored_values(run, recs) == ["x" * 50] * 9
    assert "damaged bytes" in caplog.text


def test_garbage_and_wrong_version_are_misses_not_crashes(run, caplog):
    write_journal(run, [(0, "good")])
    with open(run.path("journal-r00002-garbage.bin"), "wb") as f:
        f.write(os.urandom(300))
    with open(run.path("journal-r00003-future.bin"), "wb") as f:
        f.write(b"MPITASKER-JOURNAL 99\n" + os.urandom(50))
    with open(run.path("journal-r00004-empty.bin"), "wb"):
        pass
    with caplog.at_level(logging.WARNING):
        recs = list(run.read_records())
    assert stored_values(run, recs) == ["good"]
    assert "garbage" in caplog.text and "future" in caplog.text


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.bin"
    files.atomic_write_bytes(str(target), b"one")
    files.atomic_write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.bin"]


def write_triples(output, triples):
    results.write_output(output, len(triples), lambda i: triples[i])


def test_output_is_in_the_seed_format(tmp_path):
    output = str(tmp_path / "o.pkl")
    write_triples(output, [(0, [5], "a"), (1, [6], "b")])
    data = pickle.load(open(tmp_path / "o.pkl", "rb"))
    assert data == ([(0, [5], "a"), (1, [6], "b")],)
    assert rundir.RunDir(output).read_output() == [(0, [5], "a"), (1, [6], "b")]


def test_half_written_output_reads_as_missing(tmp_path, caplog):
    output = str(tmp_path / "o.pkl")
    write_triples(output, [(i, [i], i) for i in range(1000)])
    data = open(tmp_path / "o.pkl", "rb").read()
    open(tmp_path / "o.pkl", "wb").write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert rundir.RunDir(output).read_output() is None
    assert "cannot be read" in caplog.text


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(run):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(run.path(rundir.LOCK), "w") as f:
            json.dump({"pid": holder.pid, "host": os.uname().nodename, "since": 0}, f)
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            run.acquire_lock()
    finally:
        holder.kill()
        holder.wait()
    run.acquire_lock()
    assert json.load(open(run.path(rundir.LOCK)))["pid"] == os.getpid()
    run.release_lock()
    assert not os.path.exists(run.path(rundir.LOCK))


def test_args_digest_is_the_same_in_every_process():
    arg = ({"b", "a", "c"}, frozenset({"x", "y"}), [1.5, "s"], {"k": {"v", "w"}})
    code = (f"import sys; sys.path.insert(0, {REPO!r}); from mpitasker_ext.identity import args_digest; "
            f"print(args_digest({arg!r}).hex())")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout for seed in (1, 2, 3)}
    assert seen == {identity.args_digest(arg).hex() + "\n"}
    assert identity.args_digest(1) != identity.args_digest(2)


def test_unpicklable_argument_is_a_clear_error():
    import threading
    with pytest.raises(UsageError, match="cannot be pickled"):
        identity.args_digest(threading.Lock())


def test_code_fingerprint_follows_code_and_captured_values_not_layout():
    k = 3

    def f(x):
        return x * k

    def g(x):
        return x * k

    def h(x):
        return x + k
    assert identity.code_fingerprint(f) == identity.code_fingerprint(g)
    assert identity.code_fingerprint(f) != identity.code_fingerprint(h)
    k2 = 4

    def f2(x):
        return x * k2
    assert identity.code_fingerprint(f) != identity.code_fingerprint(f2)


SCALE = 2


def _helper(x):
    return x * SCALE


def _uses_helper(x):
    return _helper(x) + 1


def test_code_fingerprint_follows_globals_read_through_called_functions():
    global SCALE
    before = identity.code_fingerprint(_uses_helper)
    SCALE = 3
    try:
        assert identity.code_fingerprint(_uses_helper) != before
    finally:
        SCALE = 2
    assert identity.code_fingerprint(_uses_helper) == before


def test_output_path_problems_are_named(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        rundir.RunDir(str(tmp_path)).check_output_path()
    with pytest.raises(UsageError, match="does not exist"):
        rundir.RunDir(str(tmp_path / "nope" / "o.pkl")).check_output_path()
    with pytest.raises(UsageError, match="empty"):
        rundir.RunDir("")
