"""pymap's Maildir storage, adjusted to keep message bytes exact and folder names safe.

pymap's Maildir backend goes through ``mailbox.MaildirMessage`` (an
``email.message.Message``): reading re-serialises the parsed message (CRLF become
LF, headers may be re-folded), APPEND writes the re-serialised form, and COPY
writes the metadata-only message it looked up (an empty file). A health message
is often signed: its bytes are what a signature covers (RFC 8551), so here

* ``RawMaildir.get_message`` returns the file's bytes untouched (``bytes(msg)``),
* APPEND stores the client's literal exactly, and COPY copies the file's bytes,
* the UID list is parsed once per change, not once per message (pymap's FETCH of
  N messages parses it N times: quadratic),
* new messages get UIDs in arrival order (pymap numbers them in directory order),
* pymap's metadata files are written beside their target, not in /tmp
  (``write_metadata_beside_target``: pymap's rename from /tmp fails across file systems),
* ``SafeLayout`` refuses folder names that could alias or leave the mailbox
  (see ``gateway.delivery.maildir.folder_subdir``) with ``NO [CANNOT]``, and names
  longer than ``limits.FOLDER_NAME_MAX`` bytes with ``NO [LIMIT]`` (the file
  system's ENAMETOOLONG would otherwise end the connection),
* messages written by APPEND, COPY and MOVE are 0600 from their creation, folders
  0700 (Python's ``mailbox`` honours the umask: 0644 files usually).

Everything else (UID list, keywords, subscriptions, Maildir++ layout) is pymap's,
so the tree stays the one ``gateway.delivery.maildir`` writes.

Errors: ``pymap.exceptions.MailboxError`` for an invalid folder name; disk
errors propagate as ``OSError`` (pymap answers them as a server error).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from datetime import datetime
from mailbox import MaildirMessage
from typing import Any, Literal, cast

from pymap.backend.maildir.io import FileWriteable
from pymap.backend.maildir.layout import DefaultLayout
from pymap.backend.maildir.mailbox import MailboxData, MailboxSet, Maildir, Message
from pymap.backend.maildir.uidlist import Record, UidList
from pymap.exceptions import MailboxError
from pymap.parsing.message import AppendMessage
from pymap.parsing.response import ResponseCode
from pymap.parsing.specials import ObjectId

from gateway.core.durable import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE
from gateway.delivery.maildir import DeliveryError, folder_subdir
from gateway.imap.limits import FOLDER_NAME_MAX

__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "RawMailboxSet", "RawMaildir", "SafeLayout", "write_metadata_beside_target"]

#: Modes of what IMAP writes in a Maildir (whatever the umask): messages and markers, folders.
PRIVATE_FILE = PRIVATE_FILE_MODE
PRIVATE_DIR = PRIVATE_DIR_MODE


def _file_write_beside(self: FileWriteable) -> None:
    target = self.get_file(self.path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-", suffix=os.path.basename(target))
    try:
        with os.fdopen(fd, "w") as out:
            self.write(out)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    self._touched = False


def write_metadata_beside_target() -> None:
    """Make pymap write its metadata files (UID list, keywords, subscriptions) via a temporary
    file in the same directory. pymap writes them in the system temporary directory and then
    ``os.rename``s them: when the data folder is on another file system (a container volume),
    that rename fails with EXDEV and no folder can be opened. Idempotent; same semantics."""
    FileWriteable.file_write = _file_write_beside  # type: ignore[method-assign]


class _RawMessage(MaildirMessage):
    """A Maildir message carried as its exact bytes (never parsed here)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw

    def __bytes__(self) -> bytes:
        return self.raw


class RawMaildir(Maildir):
    """pymap's Maildir whose messages are read and written byte for byte."""

    def get_message(self, key: str) -> _RawMessage:
        subpath = self._lookup(key)
        path = os.path.join(self._path, subpath)
        with open(path, "rb") as f:
            msg = _RawMessage(f.read())
        subdir, name = os.path.split(subpath)
        msg.set_subdir(cast(Literal["new", "cur"], subdir))
        if self.colon in name:
            msg.set_info(name.split(self.colon)[-1])
        msg.set_date(os.path.getmtime(path))
        return msg

    def _create_tmp(self) -> Any:
        """Python's ``mailbox`` creates messages 0666 less the umask (0644 usually): a health
        message is private to its owner, so the still-empty file is made 0600 at once."""
        tmp = super()._create_tmp()  # type: ignore[misc]
        os.fchmod(tmp.fileno(), PRIVATE_FILE)
        return tmp

    def _dump_message(self, message: Any, target: Any, mangle_from_: bool = False) -> None:
        if isinstance(message, _RawMessage):
            target.write(message.raw)
        else:
            super()._dump_message(message, target, mangle_from_)


class SafeLayout(DefaultLayout[RawMaildir]):
    """pymap's Maildir++ layout, refusing folder names that could alias or escape."""

    def _get_path(self, parts: Any) -> str:
        name = "/".join(parts) if parts else "INBOX"
        if len(self._get_subdir(parts).encode("utf-8", "surrogatepass")) > FOLDER_NAME_MAX:
            raise MailboxError(name, b"Mailbox name too long.", ResponseCode.of(b"LIMIT"))
        try:
            folder_subdir(name)
        except DeliveryError:
            raise MailboxError(name, b"Invalid mailbox name.", ResponseCode.of(b"CANNOT")) from None
        return super()._get_path(parts)

    def add_folder(self, name: str, delimiter: str) -> None:
        """pymap's, with the folder's ``maildirfolder`` marker 0600 like every other file
        (the Maildir directories themselves are created 0700 by ``mailbox.Maildir``). The whole
        name is checked first: pymap looks at the parents before it, so ``a/../../b`` would be
        answered "no such parent" rather than "invalid name"."""
        self.get_path(name, delimiter)
        super().add_folder(name, delimiter)
        path = self.get_path(name, delimiter)
        os.chmod(os.path.join(path, "maildirfolder"), PRIVATE_FILE)
        os.chmod(path, PRIVATE_DIR)

    def rename_folder(self, source_name: str, dest_name: str, delimiter: str) -> None:
        for name in (source_name, dest_name):
            self._get_path(self._split(name, delimiter))
        super().rename_folder(source_name, dest_name, delimiter)


_ARRIVAL = re.compile(r"^(\d+)\.M(\d+)P\d+Q(\d+)")


def _arrival_order(key: str) -> tuple[int, int, int, str]:
    """Sort key of Maildir names ``secs.M<usec>P<pid>Q<n>...`` (ours and Python's): arrival order."""
    match = _ARRIVAL.match(key)
    if match is None:
        return (1 << 62, 0, 0, key)
    return (int(match[1]), int(match[2]), int(match[3]), key)


class _RawMailboxData(MailboxData):
    def __init__(self, mailbox_id: ObjectId, maildir: Maildir, path: str) -> None:
        super().__init__(mailbox_id, maildir, path)
        self._uid_file = os.path.join(path, UidList.FILE_NAME)
        self._uid_cache: tuple[tuple[int, int, int], dict[int, Record]] | None = None

    async def _records(self) -> dict[int, Record]:
        """The UID list, parsed again only when its file changed (pymap re-reads it per message)."""
        try:
            st = os.stat(self._uid_file)
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            signature = (0, 0, 0)
        if self._uid_cache is not None and self._uid_cache[0] == signature:
            return self._uid_cache[1]
        async with UidList.with_read(self._path) as uidl:
            records = {rec.uid: rec for rec in uidl.records}
        self._uid_cache = (signature, records)
        return records

    async def _get_maildir_msg(self, uid: int) -> tuple[Record, MaildirMessage]:
        record = (await self._records())[uid]
        async with self.messages_lock.read_lock():
            maildir_msg = self._maildir.get_message_metadata(record.key)
        return record, maildir_msg

    async def reset(self) -> MailboxData:
        """pymap's reset, but new messages get UIDs in arrival order (pymap uses directory order)."""
        keys = await self._get_keys()
        async with UidList.with_write(self._path) as uidl:
            for rec in uidl.records:
                keys.pop(rec.key, None)
            for key in sorted(keys, key=_arrival_order):
                fields = {"E": str(ObjectId.random_email_id()), "T": str(ObjectId.random_thread_id())}
                new_rec = Record(uidl.next_uid, fields, key + ":" + keys[key])
                uidl.next_uid += 1
                uidl.set(new_rec)
        self._uid_validity = uidl.uid_validity
        self._next_uid = uidl.next_uid
        return self

    async def append(self, append_msg: AppendMessage, *, recent: bool = False) -> Message:
        maildir = self._maildir
        email_id = ObjectId.random_email_id()
        thread_id = ObjectId.random_thread_id()
        async with self.messages_lock.write_lock():
            maildir_msg = _RawMessage(append_msg.literal)
            maildir_msg.set_flags(self.maildir_flags.to_maildir(append_msg.flag_set))
            maildir_msg.set_subdir("new" if recent else "cur")
            maildir_msg.set_date((append_msg.when or datetime.now()).timestamp())
            key = maildir.add(maildir_msg)
            filename = key + ":" + maildir_msg.get_info()
        async with UidList.with_write(self._path) as uidl:
            new_rec = Record(uidl.next_uid, {"E": str(email_id), "T": str(thread_id)}, filename)
            uidl.next_uid += 1
            uidl.set(new_rec)
        return Message.from_maildir(new_rec.uid, maildir_msg, maildir, key, email_id, thread_id, self.maildir_flags)

    async def copy(self, uid: int, destination: MailboxData, *, recent: bool = False) -> int | None:
        try:
            record, _ = await self._get_maildir_msg(uid)
            async with self.messages_lock.read_lock():
                source = self._maildir.get_message(record.key)
        except (KeyError, FileNotFoundError):
            return None
        copy_msg = _RawMessage(bytes(source))
        copy_msg.set_info(source.get_info())
        copy_msg.set_date(source.get_date())
        copy_msg.set_subdir("new" if recent else "cur")
        async with destination.messages_lock.write_lock():
            dest_key = destination._maildir.add(copy_msg)
            dest_filename = dest_key + ":" + copy_msg.get_info()
        async with UidList.with_write(destination._path) as uidl:
            new_rec = Record(uidl.next_uid, record.fields, dest_filename)
            uidl.next_uid += 1
            uidl.set(new_rec)
        return new_rec.uid


class RawMailboxSet(MailboxSet):
    """pymap's folder set for one Maildir, handing out byte-exact mailboxes."""

    async def get_mailbox(self, name: str) -> MailboxData:
        if name == "INBOX":
            maildir = self._inbox_maildir
        else:
            try:
                maildir = self._layout.get_folder(name, self.delimiter)
            except FileNotFoundError as exc:
                raise KeyError(name) from exc
        mbx = self._cache.get(name)
        if mbx is None:
            path = self._layout.get_path(name, self.delimiter)
            async with UidList.with_init(path) as uidl:
                mailbox_id = ObjectId(uidl.global_uid)
            mbx = _RawMailboxData(mailbox_id, maildir, path)
            self._cache[name] = mbx
        return await mbx.reset()
