"""The one place where file-system trouble becomes a user's message, and where small files are read safely.

Every OSError that names a path (permission denied, read-only file system, a name too long, a full disk, a
folder that is a file) is turned into one line naming the path (`os_errors`), at the entry of every job and
command. Small files a run reads (recipes, config.json, indexes, caches) are read through `read_small`: only
regular files, only up to a limit, so that a FIFO or a device named like one cannot block or exhaust the run.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FileError

MAX_SMALL_FILE = 64 << 20  # bytes: a config.json, an index or a recipe is far smaller (FLUX's index: 100 KB)


def os_error_text(e: OSError) -> str:
    """'PATH: reason' (and the second path of a rename or link), as the OS says it, on one line."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENAMETOOLONG:
        reason += f" (a name may have at most {name_max(Path(os.path.abspath(os.fsdecode(e.filename))).parent)} bytes)"
    if e.filename is None:
        return reason
    text = f"{os.fsdecode(e.filename)}: {reason}"
    return text + (f" ({os.fsdecode(e.filename2)})" if e.filename2 is not None else "")


def name_max(folder: Path) -> int:
    """The longest file name (bytes) `folder`'s file system takes; a folder not made yet: its nearest parent's."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


@contextmanager
def os_errors() -> Iterator[None]:
    """Inside: an OSError that names a path leaves as a FileError with one line. An OSError without a path
    (a broken pipe, a worker's failure) is left as it is: it is not about a file the user gave."""
    try:
        yield
    except FileError:
        raise
    except OSError as e:
        if e.filename is None:
            raise
        raise FileError(os_error_text(e)) from None


NOT_REGULAR = "not a regular file (a FIFO, a device or a folder cannot be read as one)"


def open_regular(path: Path | str) -> int:
    """A file descriptor of `path` for reading, only if it is a regular file: a FIFO is opened without waiting
    for a writer and refused, as a device or a folder is (an OSError naming the path)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))
    os.set_blocking(fd, True)
    return fd


def read_small(path: Path | str, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A FIFO, a device or a folder under that name, or
    a larger file, is an OSError naming the path (a FIFO is opened without waiting for a writer)."""
    fd = open_regular(path)
    try:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes, more than the {limit} such a file may have", os.fspath(path))
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"more than the {limit} bytes such a file may have", os.fspath(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
