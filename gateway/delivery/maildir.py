"""Local delivery: write a message into a local mailbox's Maildir, atomically and durably.

The on-disk layout is exactly the one pymap's Maildir backend reads with its
default ``'++'`` (Maildir++) layout, so the IMAP service (``gateway/imap/``)
sees every delivery, including while a client is IDLE::

    MAIL_ROOT/<domain>/<localpart>/          the INBOX: cur/ new/ tmp/
        .Sent/ .Drafts/ .Trash/ .Junk/       sub-folders: cur/ new/ tmp/ + an empty ``maildirfolder``
        subscriptions                        folder names, one per CRLF line (pymap's Subscriptions)
        dovecot-uidlist, dovecot-keywords    written by pymap, never by this module

A nested IMAP folder ``A/B`` (pymap's delimiter is ``/``) lives in ``.A.B``.
UIDs are assigned by pymap when it next reads the folder; this module only adds
files. File names follow the Maildir convention (``time.M<usec>P<pid>Q<n>R<random>.<host>``,
plus ``:2,<flags>`` in ``cur/``) so Dovecot could read the same tree.

Standards: the Maildir format (D. J. Bernstein, "Using maildir format"), the
Maildir++ folder convention, RFC 3501 system flags mapped to Maildir info letters
(D draft, F flagged, P passed, R replied/answered, S seen, T trashed/deleted).

Delivery is tmp/ -> write -> fsync -> rename into new/ (or cur/ when flags are given) -> fsync
of the directory: after ``deliver`` returns, the message survives a crash.

Once per queue run: the queue's workers set ``DELIVERY_RUN`` (queue id, whether the message
was claimed, i.e. an earlier run may have died after writing and before its outcome was
committed).  The file name then carries ``K<key>`` (a digest of queue id, mailbox and folder);
a claimed run first looks for that key in ``new/`` and ``cur/`` and, when a dead run already
wrote the copy, returns its name instead of writing a second one.  Only claimed runs pay for
that directory scan; a message handed to this process's worker at acceptance never does.

Every successful ``deliver`` tells the IMAP sessions of that mailbox in this process
(``mailbox_events``): an IDLE client hears of the message at once, without its folder being
re-read every second. Deliveries by other processes are seen by the IMAP service's slower
fallback poll.

Errors: ``DeliveryError`` (a sentence naming the mailbox and the cause) for an
address or folder name that cannot map to a safe path, and for any disk problem
(full disk, permissions, missing folder). Nothing is left in ``tmp/`` on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from directory.identifiers import InvalidIdentifier, normalise_address
from gateway.core.durable import write_durably
from gateway.core.errors import QueueError

__all__ = ["DEFAULT_FOLDERS", "DELIVERY_RUN", "DeliveryError", "MailboxEvents", "MaildirDelivery", "folder_subdir", "mailbox_events"]

#: Folders every mailbox has besides INBOX (created on first login or first delivery).
DEFAULT_FOLDERS: tuple[str, ...] = ("Sent", "Drafts", "Trash", "Junk")

#: Maildir "info" letters for the standard flags, in the ASCII order the format requires.
MAILDIR_FLAGS = "DFPRST"

_SUBSCRIPTIONS = "subscriptions"  # pymap.backend.maildir.subscriptions.Subscriptions
_FOLDER_MARKER = "maildirfolder"
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_FORBIDDEN_IN_NAME = frozenset("/\\\x00.")  # '.' is the Maildir++ hierarchy separator

_counter = itertools.count(1)

#: The queue run local deliveries belong to: (queue id, claimed).  Set by the queue's workers
#: around each pipeline run (``asyncio.to_thread`` carries it into the delivering thread).
DELIVERY_RUN: ContextVar[tuple[str, bool] | None] = ContextVar("mssgw_delivery_run", default=None)


def _run_key(queue_id: str, address: str, folder: str) -> str:
    return hashlib.sha256(f"{queue_id}\0{address.lower()}\0{folder}".encode()).hexdigest()[:20]


def _find_keyed(target_dir: Path, key: str) -> str | None:
    """The name of a copy written under ``key`` (by a run that died before its outcome committed)."""
    marker = f"K{key}."
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError), os.scandir(target_dir / sub) as entries:
            for entry in entries:
                if marker in entry.name:
                    return entry.name
    return None


class DeliveryError(QueueError):
    """A message could not be written to a local mailbox; the message says which and why."""


class MailboxEvents:
    """In-process change notices per mailbox, so IDLE sessions wake on a delivery instead of polling.

    A listener (an IMAP session in IDLE) ``listen``s on a mailbox's INBOX directory and gets an
    ``asyncio.Event`` set, on the listener's own loop, whenever ``changed`` is called for that
    mailbox from any thread (the queue workers deliver from a thread pool). Keys are the
    resolved INBOX paths ``MaildirDelivery.mailbox_path`` returns, so ``A@X`` and ``a@x`` meet.
    Nothing is queued: an event is a hint to re-read the folder, never the message itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    @contextlib.contextmanager
    def listen(self, mailbox: Path | str) -> Iterator[asyncio.Event]:
        """An event set at each change of ``mailbox`` until the block ends (call on a running loop)."""
        key = str(mailbox)
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._listeners.setdefault(key, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                listeners = self._listeners.get(key)
                if listeners is not None:
                    listeners.discard(entry)
                    if not listeners:
                        del self._listeners[key]

    def changed(self, mailbox: Path | str) -> int:
        """Wake every listener of ``mailbox``; returns how many were told. Safe from any thread."""
        with self._lock:
            listeners = list(self._listeners.get(str(mailbox), ()))
        for loop, event in listeners:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its session is gone
                loop.call_soon_threadsafe(event.set)
        return len(listeners)


#: The process's notices: local delivery and IMAP sessions write, IDLE sessions listen.
mailbox_events = MailboxEvents()


def _check_component(part: str, what: str) -> str:
    if not part or part in {".", ".."} or any(c in "/\\\x00" for c in part):
        raise DeliveryError(f"unsafe {what} {part!r}: it cannot name a mailbox directory")
    return part


def folder_subdir(folder: str) -> str:
    """The Maildir++ directory name of an IMAP folder: ``""`` for INBOX, ``.A.B`` for ``A/B``.

    Raises ``DeliveryError`` for an empty component or one containing ``.``, ``/``, ``\\``
    or NUL: such a name could alias another folder or leave the mailbox directory.
    """
    if folder.upper() == "INBOX":
        return ""
    parts = folder.split("/")
    for part in parts:
        if not part or any(c in _FORBIDDEN_IN_NAME for c in part) or not part.isprintable():
            raise DeliveryError(f"invalid folder name {folder!r} (no empty parts, '.', '\\' or control characters)")
    return "." + ".".join(parts)


def _hostname() -> str:
    # The Maildir specification's escapes for '/' and ':' in the host part.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


def _unique_name(key: str | None = None) -> str:
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    keyed = f"K{key}" if key else ""
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(8)}{keyed}.{_hostname()}"


def _make_maildir(path: Path) -> None:
    for sub in ("", "cur", "new", "tmp"):
        d = path / sub if sub else path
        d.mkdir(mode=_DIR_MODE, parents=not sub, exist_ok=True)


class MaildirDelivery:
    """Writes messages into ``mail_root/<domain>/<localpart>/`` Maildirs (see the module docstring)."""

    def __init__(self, mail_root: Path) -> None:
        self.mail_root = Path(mail_root).resolve()

    def mailbox_path(self, address: str) -> Path:
        """The INBOX directory of ``address`` (normalised, lower-case); never outside ``mail_root``."""
        if "\x00" in address:
            raise DeliveryError(f"unsafe address {address!r}: contains NUL")
        try:
            normalised = normalise_address(address)
        except InvalidIdentifier as exc:
            raise DeliveryError(f"cannot deliver to {address!r}: {exc}") from None
        local, _, domain = normalised.rpartition("@")
        _check_component(domain, "domain")
        _check_component(local, "local part")
        path = self.mail_root / domain / local  # lexical: an admin may symlink a domain elsewhere
        if Path(os.path.normpath(path)).parent.parent != self.mail_root:
            raise DeliveryError(f"unsafe address {address!r}: its mailbox would leave {self.mail_root}")
        return path

    def folder_path(self, address: str, folder: str = "INBOX") -> Path:
        """The Maildir directory of ``folder`` in ``address``'s mailbox."""
        subdir = folder_subdir(folder)
        base = self.mailbox_path(address)
        return base / subdir if subdir else base

    def ensure_folders(self, address: str) -> None:
        """Create INBOX, Sent, Drafts, Trash and Junk (and subscribe them) if missing. Idempotent."""
        base = self.mailbox_path(address)
        try:
            _make_maildir(base)
            for name in DEFAULT_FOLDERS:
                folder = base / folder_subdir(name)
                _make_maildir(folder)
                marker = folder / _FOLDER_MARKER
                if not marker.exists():
                    marker.touch(mode=_FILE_MODE)
            self._subscribe_defaults(base)
        except OSError as exc:
            raise DeliveryError(f"cannot create the folders of {address}: {exc.strerror} ({exc.filename})") from exc

    @staticmethod
    def _subscribe_defaults(base: Path) -> None:
        """Write the subscriptions file once; a file that exists is the user's and is left alone."""
        target = base / _SUBSCRIPTIONS
        if target.exists():
            return
        tmp = base / "tmp" / f"{_SUBSCRIPTIONS}.{_unique_name()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            os.write(fd, "".join(f"{name}\r\n" for name in DEFAULT_FOLDERS).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)  # never replaces a file written meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def deliver(self, address: str, data: bytes, *, folder: str = "INBOX", flags: str = "") -> str:
        """Write one copy of ``data`` into ``folder``; returns the file name placed in new/ or cur/.

        Without ``flags`` the message lands in ``new/`` (IMAP \\Recent); with flags (letters
        of ``DFPRST``, e.g. ``"S"`` for a Sent copy) in ``cur/`` as ``<name>:2,<flags>``.
        """
        bad = set(flags) - set(MAILDIR_FLAGS)
        if bad:
            raise DeliveryError(f"unknown Maildir flag(s) {''.join(sorted(bad))!r} (allowed: {MAILDIR_FLAGS})")
        info = "".join(sorted(set(flags)))
        target_dir = self.folder_path(address, folder)
        if not (target_dir / "new").is_dir():
            if folder.upper() == "INBOX" or folder in DEFAULT_FOLDERS:
                self.ensure_folders(address)
            else:
                raise DeliveryError(f"mailbox {address} has no folder {folder!r}")
        run = DELIVERY_RUN.get()
        key = _run_key(run[0], address, folder) if run is not None else None
        if key is not None and run is not None and run[1]:
            earlier = _find_keyed(target_dir, key)
            if earlier is not None:  # written by an earlier run of this message: once only
                return earlier
        name = _unique_name(key)
        tmp_path = target_dir / "tmp" / name
        final_name = f"{name}:2,{info}" if info else name
        final_dir = target_dir / ("cur" if info else "new")
        try:
            write_durably(tmp_path, final_dir / final_name, data, mode=_FILE_MODE)
        except OSError as exc:
            raise DeliveryError(
                f"cannot deliver to {address} ({folder}): {exc.strerror or exc} ({exc.filename or final_dir})"
            ) from exc
        mailbox_events.changed(self.mailbox_path(address))
        return final_name
