"""The bounded capture of a job's printed output (pure logic: no MPI needed)."""

import sys
import threading

from mpitasker_ext.capture import CUT_MARK, JobOutput, OutputTail


def test_tail_keeps_the_end_and_marks_the_cut():
    tail = OutputTail(limit=10)
    for i in range(100):
        tail.add(f"{i:03d}\n")
    text = tail.take()
    assert text == CUT_MARK.format(400 - 8) + "098\n099\n"
    assert tail.take() is None  # taken: the next job starts empty


def test_tail_memory_stays_bounded():
    tail = OutputTail(limit=1000)
    for _ in range(100_000):
        tail.add("x" * 50)
    assert tail._size <= 2 * 1000
    assert tail.take() == CUT_MARK.format(100_000 * 50 - 1000) + "x" * 1000


def test_job_output_interleaves_stdout_and_stderr_and_restores_streams():
    before = sys.stdout, sys.stderr
    with JobOutput() as out:
        print("to stdout")
        print("to stderr", file=sys.stderr)
        first = out.take()
        assert out.take() is None
        print("next job")
        second = out.take()
    assert (sys.stdout, sys.stderr) == before
    assert first == "to stdout\nto stderr\n"
    assert second == "next job\n"


def test_echo_passes_text_on(capsys):
    with JobOutput(echo=True) as out:
        print("seen twice")
        kept = out.take()
    assert kept == "seen twice\n"
    assert capsys.readouterr().out == "seen twice\n"


def test_other_threads_are_not_captured(capsys):
    with JobOutput() as out:
        thread = threading.Thread(target=print, args=("from another thread",))
        thread.start()
        thread.join()
        print("from the job")
        kept = out.take()
    assert kept == "from the job\n"
    assert capsys.readouterr().out == "from another thread\n"


def test_a_job_replacing_sys_stdout_is_undone():
    before = sys.stdout
    with JobOutput():
        sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - what a careless job does
    assert sys.stdout is before


def test_a_stream_kept_after_the_capture_writes_where_it_wrote_before(capsys):
    with JobOutput() as out:
        kept_stream = sys.stdout            # what logging.basicConfig() inside a job would hold on to
    kept_stream.write("after the capture\n")
    assert out.take() is None
    assert capsys.readouterr().out == "after the capture\n"


def test_a_redirection_by_another_thread_is_not_undone_by_a_capture_ending():
    """A --no-wait run in the kernel captures in its own thread while a cell (the kernel's thread) redirects
    stdout, e.g. %%capture: the capture ending must not leave the kernel's stdout on that cell's buffer."""
    import contextlib
    import io

    before = sys.stdout
    entered, redirected = threading.Event(), threading.Event()

    def batch():
        with JobOutput() as out:
            entered.set()
            redirected.wait(10)            # the job computes while the cell's redirection starts and ends
            print("job")
            out.take()

    cell_output = io.StringIO()
    worker = threading.Thread(target=batch)
    with contextlib.redirect_stdout(cell_output):
        worker.start()
        entered.wait(10)
    redirected.set()
    worker.join(10)
    assert sys.stdout is before
