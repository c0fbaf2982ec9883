"""File primitives every on-disk part shares: whole-or-nothing writes, and reads that refuse what is not a plain file.

A run directory or a store may sit under a shared project directory where anyone with write access can plant a
symlink (out of a server's root) or a FIFO (which blocks a reader forever): readers open only regular files.
"""

import errno
import json
import logging
import os
import secrets
import stat

log = logging.getLogger(__name__)

MAX_JSON_FILE = 16 * 2**20


def atomic_write_bytes(path, data, durable=True):
    """Write via a temp file and os.replace, so readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise


def open_regular(path):
    """Open a file of a run for reading only if it is a regular file, not a symlink (which could lead out of a
    server's root) nor a FIFO or device (which could block or never end a read). Raises OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, limit=None):
    """The bytes of a regular file of a run (see ``open_regular``), refusing one larger than ``limit``."""
    with open_regular(path) as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return f.read()


def read_json(path):
    """A JSON file's dict, or None when it is missing; damage is logged and reads as missing."""
    try:
        data = json.loads(read_regular(path, MAX_JSON_FILE))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:  # a planted file may nest deeper than the parser goes
        log.warning("%s is unreadable (%s); ignoring it", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("%s does not hold a JSON object; ignoring it", path)
        return None
    return data


def pread_into(f, buffer, offset):
    """Fill ``buffer`` from ``offset`` of the open file ``f``; returns the bytes read (fewer at the end)."""
    view = memoryview(buffer)
    total = 0
    fd = f.fileno()
    while total < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[total:]], offset + total)
        else:
            f.seek(offset + total)
            n = f.readinto(view[total:])
        if not n:
            break
        total += n
    return total


def unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path):
    """Make renames and unlinks in a directory durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.debug("cannot open the directory %s to fsync it (%s)", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on a directory: their renames are durable or not
        log.debug("cannot fsync the directory %s (%s)", path, exc)
    finally:
        os.close(fd)


__all__ = ["atomic_write_bytes", "open_regular", "read_regular", "read_json", "pread_into", "unlink_quietly",
           "fsync_dir"]
