"""Bounds on what an IMAP client can make the service parse, buffer or compute.

pymap parses commands on the event loop that also runs the SMTP listeners, so a
parser that loops, recurses or backtracks without bound stops the whole gateway
(ARCHITECTURE rule 9). This module holds the limits (named, with the RFC that
allows them) and replaces the few pymap routines that had no bound:

* ``modutf7_decode`` (RFC 3501 5.1.3): pymap's loops forever on an unterminated
  ``&`` shift (``SELECT "&AB"``, before login) and lets ``UnicodeDecodeError``
  escape on a bad base64 run. Ours is one linear pass and answers ``BAD``.
* The LIST pattern matcher (RFC 3501 6.3.8): pymap compiles ``*``/``%`` into a
  regular expression whose backtracking is exponential in the number of
  wildcards (``LIST "" "%%%%...x"``), and Python's ``re`` holds the GIL while
  it runs. Ours simulates the pattern as a set of positions: linear in the name
  times the pattern.

Nesting of parenthesised lists and the number of digits in a number are checked
on the raw line pieces before pymap sees them (``LineScanner``): pymap's parser recurses
once per ``(`` / ``NOT`` / ``OR`` and ``int()`` refuses more than 4300 digits with
a ``ValueError``; either would end the connection with a traceback.

``install_parser_guards`` is idempotent and is called by ``start_imap``.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable

from pymap import listtree
from pymap.parsing import modutf7
from pymap.parsing.command import auth as auth_commands
from pymap.parsing.exceptions import NotParseable
from pymap.parsing.specials import mailbox as mailbox_special

__all__ = [
    "COMMAND_MAX",
    "FOLDER_NAME_MAX",
    "LIST_PATTERN_MAX",
    "MAX_DIGITS",
    "MAX_LINE",
    "MAX_LITERALS",
    "MAX_NESTING",
    "NON_APPEND_LITERAL_MAX",
    "PRE_AUTH_COMMAND_MAX",
    "PRE_AUTH_LINE_MAX",
    "PRE_AUTH_LITERAL_MAX",
    "LineScanner",
    "install_parser_guards",
    "modutf7_decode",
]

#: Longest command line (one CRLF-terminated piece between literals) after login; also
#: the stream reader's buffer bound. RFC 7162 3.2.1 asks servers to take lines of 8192 octets.
MAX_LINE = 64 * 1024
#: Before login only LOGIN, AUTHENTICATE, STARTTLS, CAPABILITY, NOOP, ID and LOGOUT make sense.
PRE_AUTH_LINE_MAX = 8 * 1024
#: A literal before login carries a user name or a password (RFC 7888 4 lets a server refuse).
PRE_AUTH_LITERAL_MAX = 4 * 1024
#: A whole command before login: its lines, literals and SASL continuation lines together.
PRE_AUTH_COMMAND_MAX = 16 * 1024
#: A literal in any command but APPEND (pymap's own bound on synchronizing literals; RFC 7888 LITERAL-).
NON_APPEND_LITERAL_MAX = 4 * 1024
#: A whole command after login, message literals of APPEND excepted (those count against APPENDLIMIT).
COMMAND_MAX = 256 * 1024
#: Literals in one command: pymap re-parses the command from its start after each one.
MAX_LITERALS = 32
#: Parenthesised lists, NOT and OR within one command (pymap recurses once per level).
MAX_NESTING = 100
#: Digits in one number (RFC 3501 numbers are 32-bit, RFC 9051 64-bit: 20 digits).
MAX_DIGITS = 20
#: Folder names: a Maildir++ folder is one directory entry (255 bytes on common file systems).
FOLDER_NAME_MAX = 200
#: Characters in a LIST pattern: longer ones cannot match any folder name.
LIST_PATTERN_MAX = 1024

_MODUTF7_RUN = re.compile(rb"&([A-Za-z0-9+,]*)-")
_TOKENS = re.compile(
    rb'"(?:[^"\\\r\n]|\\.)*"|[()]|\b(?:NOT|OR)\b|(?<![^\s(:,.<\[{])\d+(?![^\s):,.>\]}+])', re.IGNORECASE
)


def modutf7_decode(data: bytes) -> str:
    """Decode a modified UTF-7 mailbox name (RFC 3501 5.1.3) in one pass.

    Raises ``NotParseable`` (answered ``BAD``) for an unterminated or invalid shift
    sequence, or one that decodes to a lone UTF-16 surrogate. Bytes outside a shift map to the code point of the same value, as in pymap.
    """
    parts: list[str] = []
    pos = 0
    while True:
        amp = data.find(b"&", pos)
        if amp < 0:
            parts.append(data[pos:].decode("latin-1"))
            return "".join(parts)
        parts.append(data[pos:amp].decode("latin-1"))
        match = _MODUTF7_RUN.match(data, amp)
        if match is None:
            raise NotParseable(memoryview(data))
        run = match.group(1)
        if run:
            try:
                decoded = (b"+" + run.replace(b",", b"/") + b"-").decode("utf-7")
                decoded.encode("utf-8")  # a lone surrogate names no folder
            except (UnicodeError, binascii.Error):
                raise NotParseable(memoryview(data)) from None
            parts.append(decoded)
        else:
            parts.append("&")
        pos = match.end()


class _ListPattern:
    """A LIST pattern (``*`` any characters, ``%`` any but the delimiter) matched without backtracking."""

    __slots__ = ("_delimiter", "_fold", "_tokens")

    _STAR = 0
    _PERCENT = 1

    def __init__(self, query: str, delimiter: str, *, ignore_case: bool) -> None:
        self._delimiter = delimiter
        self._fold = ignore_case
        tokens: list[int | str] = []
        for char in query[: LIST_PATTERN_MAX + 1]:
            if char in "*%":
                kind = self._STAR if char == "*" else self._PERCENT
                if tokens and isinstance(tokens[-1], int):  # runs of wildcards collapse to one
                    tokens[-1] = min(tokens[-1], kind)
                    continue
                tokens.append(kind)
            else:
                tokens.append(char.casefold() if ignore_case else char)
        self._tokens: list[int | str] | None = tokens if len(query) <= LIST_PATTERN_MAX else None

    def _closure(self, states: Iterable[int]) -> set[int]:
        tokens = self._tokens or []
        out: set[int] = set()
        for pos in states:
            while pos not in out:
                out.add(pos)
                if pos < len(tokens) and isinstance(tokens[pos], int):
                    pos += 1  # a wildcard may match nothing
                else:
                    break
        return out

    def match(self, name: str) -> bool:
        tokens = self._tokens
        if tokens is None:
            return False
        states = self._closure((0,))
        for char in name:
            key = char.casefold() if self._fold else char
            nxt: set[int] = set()
            for pos in states:
                if pos == len(tokens):
                    continue
                token = tokens[pos]
                if token == self._STAR and isinstance(token, int):
                    nxt.add(pos)
                elif isinstance(token, int):
                    if char != self._delimiter:
                        nxt.add(pos)
                elif token == key:
                    nxt.add(pos + 1)
            if not nxt:
                return False
            states = self._closure(nxt)
        return len(tokens) in states


def _get_pattern(self: listtree.ListTree, query: str) -> tuple[_ListPattern, _ListPattern]:
    delimiter = self._delimiter
    return (_ListPattern(query, delimiter, ignore_case=False), _ListPattern(query, delimiter, ignore_case=True))


class LineScanner:
    """Checks the line pieces of one command (not its literals) before pymap parses them.

    Refuses too deep a nesting of parentheses, ``NOT`` and ``OR`` (pymap's parser recurses once
    per level) and numbers of more than ``MAX_DIGITS`` digits. Quoted strings are skipped; the
    depth carries over from one piece to the next, as literals split a command into pieces.
    A false alarm only costs the client a ``BAD``.
    """

    __slots__ = ("_depth", "_operators")

    def __init__(self) -> None:
        self._depth = 0
        self._operators = [0]  # NOT/OR seen at each open parenthesis level

    def refusal(self, piece: bytes | memoryview) -> bytes | None:
        """Why this piece cannot be parsed safely, or ``None``."""
        for match in _TOKENS.finditer(piece):
            token = match.group(0)
            first = token[:1]
            if first == b"(":
                self._depth += 1
                self._operators.append(0)
            elif first == b")":
                if len(self._operators) > 1:
                    self._depth -= 1 + self._operators.pop()
            elif first.isdigit():
                if len(token) > MAX_DIGITS:
                    return b"Number too large."
                continue
            elif first != b'"':  # NOT / OR nest their arguments without parentheses
                self._depth += 1
                self._operators[-1] += 1
            if self._depth > MAX_NESTING:
                return b"Too deeply nested."
        return None


def install_parser_guards() -> None:
    """Replace pymap's unbounded decoder and LIST matcher by the bounded ones here (idempotent)."""
    modutf7.modutf7_decode = modutf7_decode
    mailbox_special.modutf7_decode = modutf7_decode  # type: ignore[attr-defined]
    auth_commands.modutf7_decode = modutf7_decode  # type: ignore[attr-defined]
    listtree.ListTree._get_pattern = _get_pattern  # type: ignore[method-assign,assignment]
