"""In-process runs (no mpiexec): the serial path keeps every rule of the MPI path."""

import logging
import os
import pickle

import pytest

from mpitasker_ext import JobsFailed, Tasker, UsageError, mpimap
from mpitasker_ext.dispatch import batch_size


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_serial_map_writes_seed_output_and_removes_run_dir():
    calls = []

    def square(x):
        calls.append(x)
        return x * x
    data = Tasker(method="serial").map("sq.pkl", square, range(20))
    assert data == [(i, [i], i * i) for i in range(20)]
    assert not os.path.exists("sq.pkl.mpi")
    assert pickle.load(open("sq.pkl", "rb")) == (data,)
    again = Tasker(method="serial").map("sq.pkl", square, range(20))
    assert again == data and len(calls) == 20


def test_failures_are_cached_around_and_rerun_alone():
    calls = []
    broken = {3, 7}

    def job(x):
        calls.append(x)
        if x in broken:
            raise ValueError(f"bad {x}")
        return -x
    with pytest.raises(JobsFailed) as info:
        mpimap(job, range(10), "f.pkl", comm=None)
    assert info.value.indices == [3, 7]
    assert "ValueError: bad 3" in str(info.value) and "indices 3, 7" in str(info.value)
    assert "job(" not in info.value.failures[3].splitlines()[1]  # first frame is the job's own code
    assert os.path.isdir("f.pkl.mpi") and not os.path.exists("f.pkl")
    broken.clear()
    calls.clear()
    assert mpimap(job, range(10), "f.pkl") == [-x for x in range(10)]
    assert sorted(calls) == [3, 7]


def test_retries_run_a_flaky_job_again():
    attempts = {}

    def flaky(x):
        attempts[x] = attempts.get(x, 0) + 1
        if x == 2 and attempts[x] < 3:
            raise RuntimeError("flaky")
        return x
    assert mpimap(flaky, range(4), "r.pkl", retries=2) == [0, 1, 2, 3]
    assert attempts[2] == 3


def test_unpicklable_result_is_a_per_job_failure():
    import threading

    def job(x):
        return threading.Lock() if x == 1 else x
    with pytest.raises(JobsFailed, match="cannot be pickled") as info:
        mpimap(job, range(3), "u.pkl")
    assert info.value.indices == [1]


def test_changed_args_recompute_only_changed_jobs_even_after_output_exists(caplog):
    calls = []

    def job(x):
        calls.append(x)
        return x * 2
    mpimap(job, [1, 2, 3, 4], "c.pkl")
    calls.clear()
    assert mpimap(job, [1, 2, 30, 4, 5], "c.pkl") == [2, 4, 60, 8, 10]
    assert calls == [30, 5]


def test_code_change_policies(caplog):
    mpimap(lambda x: x + 1, [1, 2], "k.pkl", retries=0)
    os.remove("k.pkl")  # keep the run dir state realistic: records exist, output does not
    calls = []

    def first(x):
        calls.append(x)
        if x == 2:
            raise ValueError("stop")
        return x + 1
    with pytest.raises(JobsFailed):
        mpimap(first, [1, 2], "k2.pkl")

    def changed(x):
        calls.append(x)
        return x * 100
    from mpitasker_ext import CodeChanged
    with pytest.raises(CodeChanged, match="force=True.*on_code_change='reuse'"):
        mpimap(changed, [1, 2], "k2.pkl", on_code_change="error")
    calls.clear()
    with caplog.at_level(logging.WARNING):
        assert mpimap(changed, [1, 2], "k2.pkl") == [2, 200]
    assert calls == [2] and "code changed" in caplog.text


def test_force_recomputes_everything():
    calls = []
    mpimap(lambda x: calls.append(x) or x, range(3), "force.pkl")
    mpimap(lambda x: calls.append(x) or x, range(3), "force.pkl", force=True)
    assert calls == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("args, message", [
    (5, "must be an iterable"),
    ([], "empty"),
    (iter([]), "empty"),
    ("abc", "pass a list"),
])
def test_bad_args_are_named_and_write_nothing(args, message):
    with pytest.raises(UsageError, match=message):
        Tasker(method="serial").map("bad.pkl", str, args)
    assert os.listdir(".") == []


def test_bad_options_are_named():
    with pytest.raises(UsageError, match="retries"):
        mpimap(str, [1], "o.pkl", retries=-1)
    with pytest.raises(UsageError, match="callable"):
        mpimap(5, [1], "o.pkl")
    with pytest.raises(UsageError, match="output="):
        mpimap(str, [1], None)
    with pytest.raises(UsageError, match="does not exist"):
        mpimap(str, [1], "missing/dir/o.pkl")
    assert os.listdir(".") == []


def test_batch_size_adapts_and_shrinks_at_the_end():
    assert batch_size(None, 1000, 3) == 1                  # nothing measured yet
    assert batch_size(1e-5, 100000, 3) == 2000             # 20 ms worth of 10 us jobs
    assert batch_size(1e-5, 600, 3) == 100                 # at most half a fair share of what is left
    assert batch_size(0.25, 1000, 3) == 1                  # long jobs go one by one
    assert batch_size(1e-5, 100000, 3, chunksize=7) == 7


def test_a_cached_result_that_no_longer_unpickles_is_recomputed(caplog):
    from mpitasker_ext.identity import args_digest
    from mpitasker_ext.rundir import RunDir
    run = RunDir("gone.pkl")
    run.create()
    from conftest import unloadable_payload
    from mpitasker_ext.payload import encode_value
    journal = run.new_journal(1)
    journal.append(0, True, args_digest(0), 0.0, unloadable_payload())
    journal.append_value(1, args_digest(1), 0.0, encode_value("kept"))
    journal.close()
    calls = []
    with caplog.at_level(logging.WARNING):
        assert mpimap(lambda x: calls.append(x) or "new", [0, 1], "gone.pkl") == ["new", "kept"]
    assert calls == [0] and "job 0 cannot be loaded" in caplog.text


def test_a_result_too_large_for_a_record_fails_alone(monkeypatch):
    from mpitasker_ext import journal
    monkeypatch.setattr(journal, "MAX_RECORD", 10_000)
    with pytest.raises(JobsFailed, match="more than a journal record holds") as info:
        mpimap(lambda x: b"x" * (50_000 if x == 2 else 10), range(4), "big.pkl", progress=False)
    assert info.value.indices == [2]


def test_a_result_that_fits_but_not_with_its_output_fails_alone(monkeypatch):
    """The output goes in the same record as the result: together too large, that job fails alone (the run
    stopped with RecordTooLarge)."""
    from mpitasker_ext import journal
    monkeypatch.setattr(journal, "MAX_RECORD", 10_000)

    def job(x):
        if x == 2:
            print("y" * 2_000)
        return b"x" * 9_000
    with pytest.raises(JobsFailed, match="more than a journal record holds") as info:
        mpimap(job, range(4), "big.pkl", progress=False)
    assert info.value.indices == [2]


def test_verbose_logs_a_line_per_job_and_quiet_logs_none(caplog):
    with caplog.at_level(logging.INFO, logger="mpitasker_ext"):
        mpimap(abs, [-1, -2, -3], "v.pkl", verbose=True, progress=False)
    assert sum("job" in r.getMessage() and "done in" in r.getMessage() for r in caplog.records) == 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mpitasker_ext"):
        mpimap(abs, [-4, -5], "q.pkl", progress=False)
    assert not any("done in" in r.getMessage() for r in caplog.records)


def test_mpimap_still_takes_its_former_cache_keyword(tmp_path):
    with pytest.warns(DeprecationWarning, match="output="):
        assert list(mpimap(abs, [-1, 2], cache=str(tmp_path / "old.pkl"), progress=False)) == [1, 2]
    assert (tmp_path / "old.pkl").exists()
    with pytest.raises(UsageError, match="both output= and cache="):
        mpimap(abs, [1], str(tmp_path / "a.pkl"), cache=str(tmp_path / "b.pkl"))
