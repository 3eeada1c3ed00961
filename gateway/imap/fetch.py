"""FETCH content loaded off the event loop, a bounded number at a time.

pymap loads a message for FETCH (reads the file, MIME-parses it whole) inside the
writing of its untagged response, on the event loop that also serves every SMTP and
IMAP session: three FETCH BODYSTRUCTURE of 40 MB messages froze every SMTP banner for
5 s, nine for up to 40 s (round 2, finding 202). Here, per message:

* **Off the loop.** The file is read and parsed in a pool thread (``asyncio.to_thread``);
  the event loop only waits.
* **Turns.** At most ``PARSE_CONCURRENCY`` loads run at once in the process and one per
  account (``ParseGate``); the wait is on the event loop, holding no thread. A FETCH
  waits as long as it takes (its untagged answers are already being written, so it
  cannot be refused half-way); the client's own timeout bounds it.
* **Only what is needed.** A request that needs the header alone (``BODY[HEADER]``,
  ``HEADER.FIELDS``, ``ENVELOPE``) parses only the header block.

Nothing of the messages is logged.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pymap.backend.maildir.mailbox import LoadedMessage, Message
from pymap.mime import MessageContent
from pymap.parsing.specials.fetchattr import FetchRequirement

__all__ = ["PARSE_CONCURRENCY", "GatedMessage", "ParseGate"]

#: Messages loaded for FETCH at once in the process: each parse holds the GIL in its thread.
PARSE_CONCURRENCY = 2

_HEADER_END = re.compile(rb"\r?\n\r?\n")


class ParseGate:
    """Turns for message loading: ``concurrency`` at once in the process, one per account."""

    def __init__(self, concurrency: int = PARSE_CONCURRENCY) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._accounts: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def turn(self, account: str) -> AsyncIterator[None]:
        """Hold the account's lock and a process slot while the body runs."""
        lock, users = self._accounts.get(account, (asyncio.Lock(), 0))
        self._accounts[account] = (lock, users + 1)
        try:
            async with lock, self._slots:
                yield
        finally:
            lock, users = self._accounts[account]
            if users <= 1:
                del self._accounts[account]
            else:
                self._accounts[account] = (lock, users - 1)


def _load(msg: Message, requirement: FetchRequirement) -> MessageContent | None:
    """Read and parse what ``requirement`` needs (runs in a pool thread)."""
    maildir, key = msg._maildir, msg._key
    if maildir is None or key is None:
        return None
    try:
        raw = bytes(maildir.get_message(key))
    except (KeyError, FileNotFoundError):  # expunged by another session meanwhile
        return None
    if requirement.has_none(FetchRequirement.BODY):
        end = _HEADER_END.search(raw)
        raw = raw[: end.end()] if end else raw
    return MessageContent.parse(raw)


class GatedMessage:
    """A pymap Maildir message whose ``load_content`` waits for its turn and parses in a thread."""

    def __init__(self, msg: Message, gate: ParseGate, account: str) -> None:
        self._msg = msg
        self._gate = gate
        self._account = account

    async def load_content(self, requirement: FetchRequirement) -> LoadedMessage:
        msg = self._msg
        if msg._key is None or msg._maildir is None or requirement.has_none(FetchRequirement.CONTENT):
            return await msg.load_content(requirement)
        async with self._gate.turn(self._account):
            content = await asyncio.to_thread(_load, msg, requirement)
        return LoadedMessage(msg, requirement, content)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._msg, name)
