"""A job's printed output, captured with bounded memory and kept with its record.

Printing is how people debug a job, so what a job writes to ``sys.stdout`` and ``sys.stderr`` is kept, in the
order it was written (as a terminal shows it), up to the last ``MAX_OUTPUT`` characters (older text is cut and
the cut is marked). Only the thread that runs the jobs is captured: other threads of the process (the kernel's,
the lock heartbeat) keep writing where they wrote before. With ``echo`` (scripts under ``mpiexec``) the text also
goes on to the rank's own stdout/stderr as before; on engines and in the kernel it does not, so 100k printing jobs
never make 100k lines in a cell.

Text written straight to file descriptors 1 and 2 (C extensions, subprocesses, ``sys.stdout.fileno()``) and bytes
written to ``sys.stdout.buffer`` are not captured: they go to the rank's stdout as they always did (on an engine, to
the engine's log). Everything else a job may ask of the streams (``fileno()``, ``buffer``, ``reconfigure()``) is
the original stream's, so no job breaks because it runs captured.
"""

import io
import sys
import threading

MAX_OUTPUT = 64 * 1024  # characters kept per job: the end of the output, where the error usually is
CUT_MARK = "[... {} earlier characters cut ...]\n"


class OutputTail:
    """The last ``limit`` characters written to it, and how many were cut before them."""

    def __init__(self, limit=MAX_OUTPUT):
        self.limit = limit
        self._parts = []
        self._size = 0
        self._cut = 0

    def add(self, text):
        if not text:
            return
        self._parts.append(text)
        self._size += len(text)
        if self._size > 2 * self.limit:  # trim now and then, not on every write: amortised O(1) per character
            self._trim()

    def _trim(self):
        text = "".join(self._parts)
        self._cut += len(text) - self.limit
        self._parts = [text[-self.limit:]]
        self._size = self.limit

    def take(self):
        """The captured text (None when the job wrote nothing), valid Unicode, and start afresh for the next
        job."""
        if not self._parts:
            return None
        if self._size > self.limit:
            self._trim()
        text = "".join(self._parts)
        if self._cut:
            line_end = text.find("\n", 0, 1024)  # start at a whole line when one begins soon
            if 0 <= line_end < len(text) - 1:
                self._cut += line_end + 1
                text = text[line_end + 1:]
            text = CUT_MARK.format(self._cut) + text
        self._parts, self._size, self._cut = [], 0, 0
        if not text.isascii():  # lone surrogates (a file name that is not UTF-8) kept escaped, for every reader
            text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
        return text


class _CapturedStream(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``: the capturing thread's text goes to the tail (and on to the
    original stream with ``echo``); every other thread writes to the original stream untouched, and so does
    everyone once the capture ended (a logging handler a job created keeps this stream)."""

    def __init__(self, original, tail, owner, echo):
        super().__init__()
        self._original = original
        self._tail = tail
        self._owner = owner
        self._echo = echo

    def release(self):
        self._owner = None

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if threading.get_ident() != self._owner:
            return self._original.write(text) if self._original is not None else len(text)
        self._tail.add(text)
        if self._echo and self._original is not None:
            self._original.write(text)
        return len(text)

    def flush(self):
        if self._original is not None:
            self._original.flush()

    def isatty(self):
        return False

    def fileno(self):
        """The original stream's descriptor (``faulthandler.enable()``, ``os.write``, a subprocess's stdout)."""
        if self._original is None:
            return super().fileno()
        return self._original.fileno()

    def __getattr__(self, name):
        """What ``TextIOBase`` lacks (``buffer``, ``reconfigure``, ``name``, ``mode``) is the original stream's: a
        job that uses it works as it did without the capture."""
        if name.startswith("_") or self.__dict__.get("_original") is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self._original, name)

    @property
    def encoding(self):
        return getattr(self._original, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self._original, "errors", "strict")

    def writable(self):
        return True


class JobOutput:
    """Captures the calling thread's ``sys.stdout``/``sys.stderr`` while in the ``with`` block; ``take()`` after
    each job hands back what that job wrote (or None)."""

    def __init__(self, echo=False, limit=MAX_OUTPUT):
        self.echo = echo
        self._tail = OutputTail(limit)
        self._saved = None
        self._streams = ()

    def __enter__(self):
        owner = threading.get_ident()
        self._saved = (sys.stdout, sys.stderr)
        self._streams = (_CapturedStream(sys.stdout, self._tail, owner, self.echo),
                         _CapturedStream(sys.stderr, self._tail, owner, self.echo))
        sys.stdout, sys.stderr = self._streams
        return self

    def __exit__(self, *exc_info):
        # A stream is put back only while it is still ours: another thread (the kernel's, while a --no-wait run
        # goes on in its own thread) may have redirected it meanwhile, and that redirection is its own to undo.
        # In the main thread nobody else runs, so a job that replaced sys.stdout itself is undone too.
        undo = threading.current_thread() is threading.main_thread()
        captured_out, captured_err = self._streams
        if undo or sys.stdout is captured_out:
            sys.stdout = self._saved[0]
        if undo or sys.stderr is captured_err:
            sys.stderr = self._saved[1]
        for stream in self._streams:
            stream.release()
        self._saved, self._streams = None, ()
        return False

    def take(self):
        return self._tail.take()
