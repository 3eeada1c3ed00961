"""SEARCH with a bound on the work one command may cost, and on how many run at once.

pymap's SEARCH MIME-parses every message of the folder in pure Python whatever the
key (``LARGER 100`` too). Storage work runs in pool threads, but pure-Python parsing
holds the GIL: a few searches over a folder of fuzzed messages (thousands of headers,
deep MIME trees) took 8-17 s each and starved the event loop that serves every SMTP
and IMAP session (bench/FUZZ_FINDINGS.md, finding 1). Here:

* **Cheap paths.** ``LARGER``/``SMALLER`` read the size from the file's bytes (never
  parsed); header keys (``SUBJECT``, ``FROM``, ``HEADER``, ``SENTBEFORE``...) parse the
  header block only; ``TEXT``/``BODY`` first look for the value in the raw bytes
  (case-insensitively, in C) and parse only the messages where it occurs. Keys that
  need no content (flags, UIDs, internal dates) never read a file, as in pymap.
* **Budget per SEARCH.** At most ``SEARCH_SECONDS`` of work and ``SEARCH_PARSE_BYTES``
  parsed; beyond either the command answers ``NO [LIMIT]`` (RFC 5530) and the
  session goes on.
* **Concurrency.** At most ``SEARCH_CONCURRENCY`` searches run at once in the
  process and one per account (``SearchGate``, on the event loop: a waiting search
  holds no thread). One that cannot start within ``SEARCH_WAIT`` seconds answers
  ``NO [LIMIT]``.

Nothing of the search (keys, values, results) is logged.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Iterable
from contextlib import aclosing
from typing import Any, TypeVar

from pymap.backend.maildir import Session as MaildirSession
from pymap.backend.maildir.mailbox import LoadedMessage, Message
from pymap.exceptions import ResponseError
from pymap.mime import MessageContent
from pymap.parsing.response import ResponseCode, ResponseNo
from pymap.parsing.specials import SearchKey
from pymap.parsing.specials.fetchattr import FetchRequirement
from pymap.search import SearchCriteriaSet, SearchParams
from pymap.selected import SelectedMailbox

from gateway.imap.fetch import GatedMessage

__all__ = [
    "SEARCH_CONCURRENCY",
    "SEARCH_PARSE_BYTES",
    "SEARCH_SECONDS",
    "SEARCH_WAIT",
    "BoundedSearchSession",
    "SearchGate",
    "SearchLimit",
]

#: Seconds of work one SEARCH may take (reading and parsing messages).
SEARCH_SECONDS = 10.0
#: Message bytes one SEARCH may MIME-parse (headers only count for header keys).
SEARCH_PARSE_BYTES = 64 * 1024 * 1024
#: Searches running at once in the process: each holds the GIL while it parses.
SEARCH_CONCURRENCY = 2
#: Seconds a SEARCH may wait for its turn before it is refused.
SEARCH_WAIT = 15.0

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_T = TypeVar("_T")


class SearchLimit(ResponseError):
    """A SEARCH beyond its budget or its turn: ``NO [LIMIT]``, the session goes on."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text.decode("ascii"))
        self.text = text

    def get_response(self, tag: bytes) -> ResponseNo:
        return ResponseNo(tag, self.text, ResponseCode.of(b"LIMIT"))


class _Budget:
    """The work left to one SEARCH; ``spend`` raises ``SearchLimit`` once it is used up."""

    __slots__ = ("_deadline", "_parse_left")

    def __init__(self) -> None:
        self._deadline = time.monotonic() + SEARCH_SECONDS
        self._parse_left = SEARCH_PARSE_BYTES

    def check(self) -> None:
        if time.monotonic() > self._deadline:
            raise SearchLimit(b"Search took too long; narrow it.")

    def parse(self, data: bytes) -> MessageContent:
        self.check()
        self._parse_left -= len(data)
        if self._parse_left < 0:
            raise SearchLimit(b"Search would parse too much; narrow it.")
        return MessageContent.parse(data)


class _LazyLoaded:
    """A loaded message that reads and parses only what the search key asks for.

    Stands in for pymap's ``LoadedMessage`` in ``SearchCriteria.matches``, which calls
    ``get_size``, ``get_header``, ``get_envelope_structure`` and ``contains``.
    """

    def __init__(self, msg: Message, requirement: FetchRequirement, budget: _Budget) -> None:
        self._msg = msg
        self._requirement = requirement
        self._budget = budget
        self._raw: bytes | None = None
        self._header: LoadedMessage | None = None
        self._full: LoadedMessage | None = None

    def _bytes(self) -> bytes:
        if self._raw is None:
            self._budget.check()
            maildir, key = self._msg._maildir, self._msg._key
            try:
                self._raw = bytes(maildir.get_message(key)) if maildir is not None and key is not None else b""
            except (KeyError, FileNotFoundError):  # expunged by another session meanwhile
                self._raw = b""
        return self._raw

    def _loaded(self, content: MessageContent | None) -> LoadedMessage:
        return LoadedMessage(self._msg, self._requirement, content)

    def full(self) -> LoadedMessage:
        if self._full is None:
            raw = self._bytes()
            self._full = self._loaded(self._budget.parse(raw) if raw else None)
        return self._full

    def _headers(self) -> LoadedMessage:
        if self._full is not None:
            return self._full
        if self._header is None:
            raw = self._bytes()
            end = _HEADER_END.search(raw)
            head = raw[: end.end()] if end else raw
            self._header = self._loaded(self._budget.parse(head) if head else None)
        return self._header

    def get_size(self, section: Any = None) -> int:
        return len(self._bytes()) if not section else self.full().get_size(section)

    def get_header(self, name: bytes) -> Any:
        return self._headers().get_header(name)

    def get_envelope_structure(self) -> Any:
        return self._headers().get_envelope_structure()

    def contains(self, value: bytes) -> bool:
        # Every part's header and text body is a slice of the raw bytes: no hit there, no match.
        if re.search(re.escape(value), self._bytes(), re.IGNORECASE) is None:
            return False
        return self.full().contains(value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.full(), name)


class _FetchGated(MaildirSession):
    """FETCH loads each message through ``fetch.GatedMessage`` (off the loop, in turns)."""

    async def fetch_messages(
        self, selected: SelectedMailbox, sequence_set: Any, set_seen: bool
    ) -> tuple[Iterable[tuple[int, Message]], SelectedMailbox]:
        messages, updated = await super().fetch_messages(selected, sequence_set, set_seen)
        gate = getattr(self.config, "parse_gate", None)
        if gate is None:
            return messages, updated
        gated: Any = [(seq, GatedMessage(msg, gate, str(self.owner))) for seq, msg in messages]
        return gated, updated


class BoundedSearchSession(_FetchGated):
    """pymap's Maildir session whose SEARCH reads only what its keys need, within a budget."""

    async def search_mailbox(
        self, selected: SelectedMailbox, keys: frozenset[SearchKey]
    ) -> tuple[Iterable[tuple[int, Message]], SelectedMailbox]:
        mbx = await self._get_selected(selected)
        requirement = FetchRequirement.reduce(key.requirement for key in keys)
        search = SearchCriteriaSet(keys, SearchParams(selected, disabled=self.config.disable_search_keys))
        needs_content = not requirement.has_none(FetchRequirement.CONTENT)
        budget = _Budget()
        found: list[tuple[int, Message]] = []
        found_messages: Any = mbx.find(search.sequence_set, selected)  # an async generator
        async with aclosing(found_messages) as messages:  # closed on NO [LIMIT] too
            async for seq, msg in messages:
                budget.check()
                loaded: Any = (
                    _LazyLoaded(msg, requirement, budget) if needs_content else await msg.load_content(requirement)
                )
                if search.matches(seq, msg, loaded):
                    found.append((seq, msg))
        return found, await mbx.update_selected(selected)


class SearchGate:
    """Turns for SEARCH on the service's event loop: ``concurrency`` at once, one per account."""

    def __init__(self, concurrency: int = SEARCH_CONCURRENCY) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._accounts: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self, account: str, work: Awaitable[_T], *, also_close: Any = None) -> _T:
        """Await ``work`` once it is this account's and the process's turn, else ``SearchLimit``.

        ``work`` (and ``also_close``, the coroutine it wraps) are closed unstarted when refused,
        so no "coroutine was never awaited" warning is left behind.
        """
        lock, users = self._accounts.get(account, (asyncio.Lock(), 0))
        self._accounts[account] = (lock, users + 1)
        try:
            try:
                await self._acquire(lock)
            except BaseException:
                for coro in (work, also_close):
                    close = getattr(coro, "close", None)
                    if close is not None:
                        close()
                raise
            try:
                return await work
            finally:
                self._slots.release()
                lock.release()
        finally:
            lock, users = self._accounts[account]
            if users <= 1:
                del self._accounts[account]
            else:
                self._accounts[account] = (lock, users - 1)

    async def _acquire(self, lock: asyncio.Lock) -> None:
        """The account's lock, then a process slot, within ``SEARCH_WAIT`` seconds."""
        try:
            async with asyncio.timeout(SEARCH_WAIT):
                await lock.acquire()
                try:
                    await self._slots.acquire()
                except BaseException:
                    lock.release()
                    raise
        except TimeoutError:
            raise SearchLimit(b"Too many searches at once; try again later.") from None

