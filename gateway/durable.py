"""Writing a file so that it survives a crash: temporary name, fsync, rename, fsync of the folder.

Used wherever an accepted message is put on disk (the queue's spool, Maildir
delivery): after ``write_durably`` returns, the file is complete under its final
name or absent, never half-written, even on power loss (POSIX rename is atomic;
the folder's fsync makes the rename itself durable).

Errors: ``OSError`` from the system, after the temporary file was removed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(tmp: Path, final: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``tmp`` (which must not exist), fsync it, rename it to ``final``, fsync the folder."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
