"""The result store: format-3 records, scans that never unpickle, lazy results, the streamed output. Real files."""

import logging
import os
import pickle
import tracemalloc

import numpy as np
import pytest

import mpitasker_ext
from conftest import seed_load
from mpitasker_ext import files, identity, journal, payload, progress, rundir, store
from mpitasker_ext import results as resultsmod
from mpitasker_ext import scan as scanmod
from mpitasker_ext.errors import CacheError
from mpitasker_ext.results import Results, write_output
from mpitasker_ext.scan import scan_journals


def touch_and_return(marker, value):
    """Unpickling a ``Touching`` calls this: the marker file shows that (and when) a record was unpickled."""
    with open(marker, "a") as f:
        f.write("x")
    return value


class Touching:
    def __init__(self, marker, value):
        self.marker, self.value = marker, value

    def __reduce__(self):
        return (touch_and_return, (self.marker, self.value))


def notebook_class():
    """A class as a notebook cell defines it: plain pickle cannot find it by name, cloudpickle carries it."""
    namespace = {"__name__": "__main__"}
    exec("class Point:\n    def __init__(self, x):\n        self.x = x\n"
         "    def __eq__(self, other):\n        return type(other).__name__ == 'Point' and other.x == self.x\n",
         namespace)
    return namespace["Point"]


def digest(i):
    return identity.args_digest(i)


@pytest.fixture
def run(tmp_path):
    c = rundir.RunDir(str(tmp_path / "out.pkl"))
    c.create()
    return c


def write_values(run, values, rank=1):
    w = run.new_journal(rank)
    for i, value in enumerate(values):
        w.append_value(i, digest(i), 0.01, payload.encode_value(value))
    w.close()
    return w.path


def read_back(run, n):
    scan = scan_journals(run.journal_paths())
    return [payload.read_value(scan.ok[digest(i)]) for i in range(n)]


# -- records -------------------------------------------------------------------------------------------------------

def test_values_and_arrays_round_trip_with_their_layout(run):
    base = np.arange(60000, dtype=np.float64).reshape(200, 300)
    values = [base, np.asfortranarray(base), base[:, ::3], np.array(7.5), np.arange(10, dtype=np.int8),
              np.array([{"a": 1}, None, "s"], dtype=object), np.zeros(5000, dtype=[("x", "<f8"), ("n", "<i4")]),
              bytearray(b"z" * 100000), {"nested": [base[:2], (1, "two")]}, None, "text", 10 ** 30]
    got = read_back(run, len(values)) if write_values(run, values) else None
    for value, back in zip(values, got, strict=True):
        if isinstance(value, np.ndarray):
            assert back.dtype == value.dtype and back.shape == value.shape
            assert (back == value).all() if value.dtype != object else list(back) == list(value)
        else:
            assert str(back) == str(value) if isinstance(value, dict) else back == value
    assert got[1].flags.f_contiguous and not got[1].flags.c_contiguous
    assert got[0].flags.writeable                               # a view into the bytes read, which are ours


def test_big_buffers_go_out_of_band_and_object_arrays_in_band():
    big = np.ones(100000)
    encoded = payload.encode_value(big)
    assert len(encoded.buffers) == 1 and encoded.buffers[0].obj is not None
    assert len(encoded.pickle) < 300 and encoded.size == len(encoded.to_bytes())
    assert np.shares_memory(np.frombuffer(encoded.buffers[0], dtype=big.dtype), big)     # never copied
    assert payload.encode_value(np.array([object()] * 1000, dtype=object)).buffers == []
    assert payload.encode_value(np.ones(100000)[::2]).buffers == []                       # non-contiguous: in-band
    assert payload.encode_value(np.ones(10)).buffers == []                                # small: in-band


def test_notebook_classes_fall_back_to_cloudpickle(run):
    point = notebook_class()
    with pytest.raises(Exception):  # noqa: B017 - plain pickle cannot, whatever it raises
        pickle.dumps(point(1))
    write_values(run, [point(3), [point(4), np.ones(5000)]])
    first, second = read_back(run, 2)
    assert first.x == 3 and second[0].x == 4 and (second[1] == 1).all()


def test_a_record_over_the_limit_is_refused_and_nothing_is_written(run, monkeypatch):
    monkeypatch.setattr(journal, "MAX_RECORD", 10000)
    w = run.new_journal(1)
    size = os.path.getsize(w.path)
    with pytest.raises(journal.RecordTooLarge):
        w.append_value(0, digest(0), 0.0, payload.encode_value(np.ones(5000)))
    w.append_value(1, digest(1), 0.0, payload.encode_value(np.ones(100)))
    w.close()
    assert os.path.getsize(w.path) > size
    scan = scan_journals([w.path])
    assert list(scan.ok) == [digest(1)]


def test_partial_writes_and_more_parts_than_iov_max(run, monkeypatch):
    real = os.writev
    calls = []

    def stingy(fd, buffers):
        calls.append(len(buffers))
        first = bytes(buffers[0])[:777]
        return real(fd, [first])

    monkeypatch.setattr(os, "writev", stingy)
    many = [np.full(1200, i, dtype=np.float64) for i in range(700)]        # 1,400 parts, each > 4 KiB
    write_values(run, [many, np.arange(3000.0)])
    monkeypatch.setattr(os, "writev", real)
    got = read_back(run, 2)
    assert all((a == b).all() for a, b in zip(got[0], many, strict=True)) and (got[1] == np.arange(3000.0)).all()
    assert max(calls) <= 1024 and len(calls) > 100


# -- scanning ------------------------------------------------------------------------------------------------------

def test_torn_tail_and_flipped_byte_are_skipped_with_warnings(run, caplog):
    path = write_values(run, [np.full(2000, i, dtype=np.float64) for i in range(10)])
    scan = scan_journals([path])
    loc5, loc9 = scan.ok[digest(5)], scan.ok[digest(9)]
    with open(path, "r+b") as f:
        f.seek(loc5.offset + loc5.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.truncate(loc9.offset + loc9.length - 5)
    with caplog.at_level(logging.WARNING):
        scan = scan_journals([path])
    assert sorted(scan.ok) == sorted(digest(i) for i in range(10) if i not in (5, 9)) and scan.records == 8
    assert "damaged bytes" in caplog.text and os.path.basename(path) in caplog.text
    with pytest.raises(payload.DamagedRecord, match="checksum"):
        payload.read_value(loc5)
    assert (payload.read_value(scan.ok[digest(8)]) == 8).all()


def test_a_small_torn_tail_is_named_as_such(run, caplog):
    path = write_values(run, list(range(5)))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with caplog.at_level(logging.WARNING):
        scan = scan_journals([path])
    assert len(scan.ok) == 4 and "torn tail" in caplog.text


def test_frames_bigger_than_the_scan_window_are_checked_in_chunks(run, monkeypatch):
    monkeypatch.setattr(scanmod, "CHUNK", 64 * 1024)
    path = write_values(run, [np.full(50000, i, dtype=np.float64) for i in range(4)] + ["small"])
    loc = scan_journals([path]).ok[digest(2)]
    with open(path, "r+b") as f:
        f.seek(loc.offset + loc.length - 100)
        f.write(b"\0" * 8)
    scan = scan_journals([path])
    assert sorted(scan.ok) == sorted(digest(i) for i in (0, 1, 3, 4))
    assert payload.read_value(scan.ok[digest(4)]) == "small" and (payload.read_value(scan.ok[digest(3)]) == 3).all()


def test_a_frame_bigger_than_the_window_before_one_set_aside_is_kept(tmp_path):
    """A stored result that no longer loads is set aside (its magic overwritten) and computed again; a large
    result written just before it is still found by the next run, not recomputed as damage."""
    out = str(tmp_path / "big.pkl")
    calls = []

    def job(x):
        calls.append(x)
        return np.full(1 << 20, x, dtype=np.float64) if x == 0 else x   # 8 MB: bigger than the scan window
    mpitasker_ext.mpimap(job, [0, 1], out, prune=True, progress=False)    # compacted: the frames are adjacent
    st = store.ResultStore(out)
    store.set_aside(scan_journals(st.journal_paths()).ok[digest(1)])     # as finish does when it does not load
    calls.clear()
    values = mpitasker_ext.mpimap(job, [0, 1], out, progress=False)
    assert calls == [1] and (values[0] == 0).all() and values[1] == 1


def test_an_ok_record_with_output_gives_its_value_and_its_output_apart(run, tmp_path, monkeypatch):
    """Kind 3: the output before the ok payload. Values read as from kind 0 (arrays out of band included); the
    output is read without the pickle, even from a frame larger than the scan window; damage is named."""
    monkeypatch.setattr(scanmod, "CHUNK", 64 * 1024)
    marker = tmp_path / "unpickled"
    w = run.new_journal(1)
    big = np.arange(50000, dtype=np.float64)
    w.append_value(0, digest(0), 0.0, payload.encode_value(big), output="héllo \udcff\n")
    w.append_value(1, digest(1), 0.0, payload.Encoded(pickle.dumps(Touching(str(marker), 1)), []), output="one\n")
    w.append_value(2, digest(2), 0.0, payload.encode_value("plain"))
    w.close()
    scan = scan_journals([w.path])
    kinds = [r.kind for r in scanmod.journal_records(w.path)]
    assert kinds == [journal.OK_OUTPUT, journal.OK_OUTPUT, journal.OK] and scan.records == 3
    assert scanmod.read_output(scan.ok[digest(0)]) == "héllo \\udcff\n"    # a lone surrogate kept escaped
    assert scanmod.read_output(scan.ok[digest(1)]) == "one\n" and not marker.exists()
    assert scanmod.read_output(scan.ok[digest(2)]) == ""
    assert (payload.read_value(scan.ok[digest(0)]) == big).all() and payload.read_value(scan.ok[digest(2)]) == "plain"
    journals = payload.OpenJournals()
    assert (journals.read_value(scan.ok[digest(0)]) == big).all()
    journals.close()
    loc = scan.ok[digest(0)]
    with open(w.path, "r+b") as f:
        f.seek(loc.offset + loc.length - 100)
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="checksum"):
        scanmod.read_output(loc)


def test_scanning_never_unpickles(run, tmp_path):
    marker = tmp_path / "unpickled"
    w = run.new_journal(1)
    w.append_value(0, digest(0), 0.0, payload.Encoded(pickle.dumps(Touching(str(marker), 1)), []))
    w.close()
    scan = scan_journals(run.journal_paths())
    assert digest(0) in scan.ok and not marker.exists()
    assert payload.read_value(scan.ok[digest(0)]) == 1 and marker.exists()      # the plant works when read


def test_failures_interrupted_batches_and_first_ok_wins(run):
    w = run.new_journal(2)
    w.start_batch([0, 1, 2])
    w.append(0, False, digest(0), 0.1, journal.encode_failure({"index": 0, "arg": "0", "error": "E", "traceback": "T"}))
    w.append_value(1, digest(1), 0.1, payload.encode_value("first"))
    w.close()
    later = run.new_journal(3)
    later.append_value(1, digest(1), 0.1, payload.encode_value("second"))
    later.append_value(0, digest(0), 0.1, payload.encode_value("zero"))
    later.append(7, False, digest(7), 0.1, b"not json")
    later.close()
    scan = scan_journals([w.path, later.path])
    assert payload.read_value(scan.ok[digest(1)]) == "first" and payload.read_value(scan.ok[digest(0)]) == "zero"
    assert list(scan.failed) == [digest(7)] and scan.failed[digest(7)].failure()["error"].startswith("(failure")
    assert [(info.in_flight, info.rank) for info in scan.interrupted] == [(2, 2)]
    assert scan.records == 5 and dict(scan.ok.items())[digest(0)] == scan.ok.get(digest(0))


def test_format_2_journals_and_garbage_are_read_without_crashing(run, caplog):
    old = run.path("journal-r00001-old.bin")
    failure = journal.encode_failure({"index": 1, "arg": "1", "error": "old failure", "traceback": ""})
    with open(old, "wb") as f:
        f.write(b"MPITASKER-JOURNAL 2 {\"rank\": 1}\n" + journal.encode_record(0, journal.OK, digest(0), 0.0,
                pickle.dumps("old")) + journal.encode_record(1, journal.FAILED, digest(1), 0.0, failure))
    garbage = run.path("journal-r00002-garbage.bin")
    with open(garbage, "wb") as f:
        f.write(b"garbage, not a journal")
    with caplog.at_level(logging.WARNING):
        scan = scan_journals([old, garbage, run.path("journal-missing.bin")])
    assert len(scan.ok) == 0 and scan.old_format == 1 and scan.failed[digest(1)].failure()["error"] == "old failure"
    assert "not a format-3 journal" in caplog.text and "garbage" in caplog.text and "unreadable" in caplog.text


def test_read_value_names_damage(run, tmp_path):
    path = write_values(run, ["a", "b"])
    scan = scan_journals([path])
    loc = scan.ok[digest(0)]
    with pytest.raises(payload.DamagedRecord, match="no frame starts"):
        payload.read_value(loc._replace(offset=loc.offset + 1))
    with pytest.raises(payload.DamagedRecord, match="holds"):
        payload.read_value(loc._replace(length=loc.length + 1))
    with pytest.raises(payload.DamagedRecord, match="ends 1 bytes early"):
        payload.read_value(scan.ok[digest(1)]._replace(offset=scan.ok[digest(1)].offset + 1))
    with pytest.raises(payload.DamagedRecord, match="gone"):
        payload.read_value(loc._replace(journal=str(tmp_path / "nope.bin")))
    assert isinstance(payload.DamagedRecord("x"), CacheError)


# -- the store and lazy results ------------------------------------------------------------------------------------

def finished_store(tmp_path, values, args=None, prune=False):
    """What a finished run leaves: its journal adopted into the store, the grid indexed."""
    output = str(tmp_path / "res.pkl")
    run = rundir.RunDir(output)
    run.create()
    args = list(range(len(values))) if args is None else args
    w = run.new_journal(1)
    for i, value in enumerate(values):
        w.append_value(i, identity.args_digest(args[i]), 0.0, payload.encode_value(value))
    w.close()
    rs = store.ResultStore(output)
    moved = rs.adopt(run.journal_paths())
    scan = scan_journals(rs.journal_paths())
    rs.write_index([scan.ok[identity.args_digest(arg)] for arg in args], args)
    rs.write_meta("code", "fn")
    run.remove()
    return output, rs, moved


def test_adopt_index_and_lazy_reads(tmp_path):
    markers = [tmp_path / f"m{i}" for i in range(5)]
    output, rs, moved = finished_store(tmp_path, [Touching(str(m), i * 10) for i, m in enumerate(markers)])
    assert rs.exists() and list(moved.values()) == rs.journal_paths() and not os.path.exists(output + ".mpi")
    assert rs.read_meta()["format"] == 3 and rs.read_meta()["code"] == "code"
    results = Results(output)
    assert len(results) == 5 and not any(m.exists() for m in markers)
    assert results[3] == (3, [3], 30)
    assert [m.exists() for m in markers] == [False, False, False, True, False]
    assert Results(output, kind="values")[-1] == 40 and markers[4].exists() and not markers[0].exists()


def test_results_behave_like_a_list(tmp_path, monkeypatch):
    output, rs, _ = finished_store(tmp_path, [i * i for i in range(20)], args=[f"a{i}" for i in range(20)])
    results = Results(output)
    expected = [(i, [f"a{i}"], i * i) for i in range(20)]
    assert results == expected and expected == results and results == tuple(expected) and results != expected[:-1]
    assert results == Results(output) and (results != expected) is False
    assert results[-1] == expected[-1] and results[2:9:3] == expected[2:9:3] and results[::-1] == expected[::-1]
    with pytest.raises(IndexError):
        results[20]
    with pytest.raises(TypeError):
        results["1"]
    assert list(results) == expected and results.to_list() == expected
    assert repr(results) == repr(expected)                 # printed whole, as the list it stands for
    monkeypatch.setattr(resultsmod, "_REPR_WHOLE", 7)
    assert repr(results) == "[" + ", ".join(map(repr, expected[:3])) + ", ..., " + ", ".join(
        map(repr, expected[-3:])) + "] (20 items)"
    assert repr(Results(output, kind="values")[:4]) == "[0, 1, 4, 9]"
    assert pickle.loads(pickle.dumps(results)) == expected and type(pickle.loads(pickle.dumps(results))) is list
    values = Results(output, args=[f"a{i}" for i in range(20)], kind="values")
    assert values.index(49) == 7 and 361 in values and values.count(4) == 1
    with pytest.raises(CacheError, match="holds 20 jobs"):
        Results(output, args=[1, 2])
    with pytest.raises(CacheError, match="no stored results"):
        Results(str(tmp_path / "other.pkl"))


def test_duplicates_share_a_location_and_args_must_match_the_index(tmp_path):
    output, rs, _ = finished_store(tmp_path, ["x", "y"])
    scan = scan_journals(rs.journal_paths())
    rs.write_index([scan.ok[digest(1)], scan.ok[digest(0)], scan.ok[digest(1)]], [1, 0, 1])
    assert Results(output) == [(0, [1], "y"), (1, [0], "x"), (2, [1], "y")]
    files.atomic_write_bytes(os.path.join(rs.path, store.ARGS), pickle.dumps([5, 6, 7]))
    with pytest.raises(payload.DamagedRecord, match="does not belong"):
        Results(output)[0]
    with open(os.path.join(rs.path, store.INDEX), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 1)
    with pytest.raises(payload.DamagedRecord, match="index"):
        rs.read_index()


def test_load_prefers_the_index_of_this_very_output(tmp_path):
    output, rs, _ = finished_store(tmp_path, ["a", "b"])
    assert isinstance(mpitasker_ext.load(output), Results)         # output gone: the store has it
    write_output(output, 2, lambda i: (i, [i], "ab"[i]))
    run = rundir.RunDir(output)
    st = os.stat(output)
    run.write_meta(2, "code", "fn", output_identity=[st.st_size, st.st_mtime_ns])
    loaded = mpitasker_ext.load(output, kind="values")
    assert isinstance(loaded, Results) and loaded == ["a", "b"]
    with open(output, "wb") as f:                                       # rewritten by some other tool
        pickle.dump(([(0, [0], "other")],), f)
    assert mpitasker_ext.load(output) == [(0, [0], "other")] and type(mpitasker_ext.load(output)) is list


def test_load_reads_a_blog_format_output(tmp_path):
    output = str(tmp_path / "blog.pkl")
    with open(output, "wb") as f:
        pickle.dump(([(0, [1.0], "one"), (1, [2.0], "two")],), f)
    assert mpitasker_ext.load(output) == [(0, [1.0], "one"), (1, [2.0], "two")]
    assert mpitasker_ext.load(output, kind="values") == ["one", "two"]
    assert "load" in mpitasker_ext.__all__


def test_compact_keeps_exactly_the_kept_digests(tmp_path):
    output, rs, _ = finished_store(tmp_path, [f"v{i}" for i in range(10)])
    run = rundir.RunDir(output)
    run.create()
    w = run.new_journal(2)
    w.append_value(20, digest(20), 0.0, payload.encode_value(np.full(3000, 20.0)))
    w.append(21, False, digest(21), 0.0, journal.encode_failure({"index": 21, "error": "E"}))
    w.close()
    rs.adopt(run.journal_paths())
    before = rs.journal_paths()
    keep = {digest(i) for i in (1, 3, 5, 7, 9)}
    new = rs.compact(keep | {digest(20)}, scan_journals(rs.journal_paths()))
    after = rs.journal_paths()
    assert len(after) == 1 and not set(after) & set(before)
    scan = scan_journals(after)
    assert set(scan.ok) == keep | {digest(20)} and scan.failed == {} and dict(new.items()) == dict(scan.ok.items())
    assert (payload.read_value(scan.ok[digest(20)]) == 20).all() and payload.read_value(scan.ok[digest(3)]) == "v3"
    assert not os.path.exists(os.path.join(rs.path, store.INDEX))     # it named pruned results
    rs.write_index([scan.ok[digest(i)] for i in (1, 3)], [1, 3])
    rs.compact(None, scan)
    assert Results(output) == [(0, [1], "v1"), (1, [3], "v3")]  # the index follows the frames
    rs.discard()
    assert not rs.exists() and rs.journal_paths() == []


# -- the streamed output -------------------------------------------------------------------------------------------

def test_write_output_streams_one_result_at_a_time(tmp_path):
    output = str(tmp_path / "big.pkl")
    live = []

    def triple_at(i):
        value = np.full(262144, i, dtype=np.float64)                    # 2 MB, made when asked for
        live.append(i)
        return (i, [i], value)

    tracemalloc.start()
    try:
        write_output(output, 200, triple_at)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, peak                                     # 400 MB written, a few results held
    assert live == list(range(200))
    data = seed_load(output)
    assert len(data) == 200 and all(t[0] == i and t[1] == [i] and (t[2] == i).all() for i, t in enumerate(data))
    assert [n for n in os.listdir(tmp_path) if n != "big.pkl"] == []


def test_write_output_falls_back_for_cycles_and_notebook_classes(tmp_path, caplog):
    output = str(tmp_path / "out.pkl")
    cyclic = [1]
    cyclic.append(cyclic)
    point = notebook_class()
    with caplog.at_level(logging.INFO, logger="mpitasker_ext.results"):
        write_output(output, 3, lambda i: (i, [i], [cyclic, point(5), "plain"][i]))
    data = seed_load(output)
    assert data[0][2][1] is data[0][2] and data[1][2].x == 5 and data[2] == (2, [2], "plain")
    assert "cannot stream" in caplog.text


def test_write_output_passes_on_what_the_source_raises(tmp_path):
    output = str(tmp_path / "out.pkl")

    def triple_at(i):
        if i == 2:
            raise KeyError("record 2 is damaged")
        return (i, [i], i)

    with pytest.raises(KeyError, match="record 2"):
        write_output(output, 4, triple_at)
    assert os.listdir(tmp_path) == []


def test_single_result_output_reads_in_the_blog_format(tmp_path):
    output = str(tmp_path / "one.pkl")
    write_output(output, 1, lambda i: (0, ["x"], {"r": 1}))
    assert seed_load(output) == [(0, ["x"], {"r": 1})]


# -- progress counts through the scan ------------------------------------------------------------------------------

def test_stale_progress_counts_distinct_results_without_unpickling(run, tmp_path):
    marker = tmp_path / "unpickled"
    w = run.new_journal(1)
    for i in range(3):
        w.append_value(i, digest(i), 0.0, payload.Encoded(pickle.dumps(Touching(str(marker), i)), []))
    w.append_value(0, digest(0), 0.0, payload.encode_value(0))               # a duplicate counts once
    w.append(5, False, digest(5), 0.0, journal.encode_failure({"index": 5, "arg": "5", "error": "Boom"}))
    w.close()
    p = progress.read_progress(run.output)
    assert (p.state, p.done, p.failed) == ("stale", 3, 1) and [f.error for f in p.failures] == ["Boom"]
    assert not marker.exists()


def test_a_value_sharing_parts_is_not_expanded_in_the_output(tmp_path, monkeypatch):
    """x = [x, x] nested 30 times pickles to ~200 bytes with a memo and to 2**30 items without one: the stream
    notices the growth and writes that output the eager way instead."""
    from mpitasker_ext import mpimap
    monkeypatch.chdir(tmp_path)

    def nested(depth):
        x = []
        for _ in range(depth):
            x = [x, x]
        return x
    mpimap(nested, [30, 2], "n.pkl", comm=None, progress=False)
    assert os.path.getsize("n.pkl") < 10_000
    with open("n.pkl", "rb") as f:
        value = pickle.load(f)[0][0][2]
    assert value[0] is value[1]


def test_a_planted_journal_of_huge_claimed_frames_is_scanned_in_linear_time(tmp_path):
    import struct
    import time
    path = tmp_path / "journal-r00001-x.bin"
    unit = b"MTJ\x01" + struct.pack("<II", 5 << 20, 0)
    path.write_bytes(b"MPITASKER-JOURNAL %d\n" % journal.FORMAT_VERSION + unit * ((6 << 20) // len(unit)))
    started = time.monotonic()
    scan = scan_journals([str(path)])
    assert scan.records == 0 and time.monotonic() - started < 10


@pytest.mark.parametrize("name", ["/etc/passwd", "../../outside.bin", "..", "sub/journal.bin", ""])
def test_an_index_naming_a_file_outside_the_store_is_damage(tmp_path, name):
    """A planted index.bin must not make a reader (the dashboard's job output, Results) open another file."""
    output, rs, _ = finished_store(tmp_path, ["x", "y"])
    data = bytearray(open(rs._file(store.INDEX), "rb").read())
    head = store._INDEX_HEAD.size
    (length,) = store._INDEX_NAME.unpack_from(data, head)
    planted = name.encode()
    data[head:head + store._INDEX_NAME.size + length] = store._INDEX_NAME.pack(len(planted)) + planted
    with open(rs._file(store.INDEX), "wb") as f:
        f.write(data)
    with pytest.raises(store.DamagedRecord, match="not a file of the store|damaged"):
        rs.read_index()
    assert not rs.has_index()
