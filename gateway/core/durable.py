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

#: Files of an operator's home hold health data and password hashes: nobody else may read them.
PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_umask() -> None:
    """Make every file this process creates from now on private (0600 files, 0700 folders).

    Called when the gateway or the CLI opens an operator's home (``directory.db.make_engine``):
    SQLite, Maildir and the spool create files and folders, and a 022 umask would leave them
    readable by every local user.  Only ever narrows the umask.
    """
    current = os.umask(PRIVATE_UMASK)
    os.umask(current | PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as private folders; an existing ``path`` is made 0700."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=PRIVATE_DIR_MODE)
        os.chmod(p, PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> None:
    """Make an existing file 0600 (created earlier under a wider umask); a missing one is left alone."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, PRIVATE_FILE_MODE)


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
