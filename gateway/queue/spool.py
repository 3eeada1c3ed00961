"""Where the bytes of queued messages live on one node: a private folder of fsynced files.

The job: ``write`` stores a message's bytes durably (tmp -> fsync -> rename -> fsync of the
folder, ``gateway.durable.write_durably``) before the rows that point at them are committed, so
a row never points at missing bytes; ``remove`` drops the bytes of finished messages after the
commit that made them final; ``files`` lists what is there for the orphan sweep.  Files are
0600 in 0700 folders (plaintext of messages waiting), fanned out by the first two hex digits.

Errors: ``OSError`` from the file system (the caller turns it into a temporary failure);
``FileExistsError`` for a queue id already in use (stored bytes are never overwritten).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from gateway.durable import PRIVATE_DIR_MODE, private_dir, write_durably

__all__ = ["Spool"]

log = logging.getLogger("mssgw.queue")


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        private_dir(directory)

    def path(self, name: str) -> Path:
        return self.directory / name[:2] / name

    def write(self, name: str, data: bytes) -> Path:
        final = self.path(name)
        final.parent.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        if final.exists():  # a caller-chosen id already in use: never overwrite stored bytes
            raise FileExistsError(17, "queue id already in use", str(final))
        write_durably(final.with_name(f".{name}.tmp"), final, data)
        return final

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def discard(self, name: str) -> None:
        """Remove bytes that were never acknowledged (their rows did not commit)."""
        self.path(name).unlink(missing_ok=True)

    def remove(self, names: Sequence[str]) -> None:
        """Remove the bytes of finished messages (their rows already say ``purged_at``).

        Called after the commit that made them final: a crash before this leaves files that the
        orphan sweep removes; a message whose bytes are gone is never claimable.
        """
        for name in names:
            try:
                self.path(name).unlink(missing_ok=True)
            except OSError as exc:  # left for the sweep
                log.warning("spool file %s could not be removed (%s)", name, exc.strerror)

    def files(self) -> Iterator[Path]:
        """Every file in the spool, temporary ones (``.<name>.tmp``) included."""
        return self.directory.glob("*/*")
