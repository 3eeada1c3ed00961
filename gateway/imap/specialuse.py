"""Special-use folders (RFC 6154): which folder is Sent, Drafts, Trash or Junk, said in LIST.

Mail clients (Thunderbird, Outlook, neomutt, mbsync's ``Patterns``) look for ``\\Sent`` and its
siblings in the LIST answer to decide where to file their own copies; without them each client
guesses a name ("Sent Items", "Envoyés") and creates a second folder. Here:

* ``attributes_for`` adds the attribute of each default folder (``gateway.delivery.maildir``
  creates them) to the LIST attributes; other folders are left as they are.
* ``ExtendedListCommand`` accepts the two LIST-EXTENDED (RFC 5258) forms RFC 6154 defines for
  clients that saw ``SPECIAL-USE`` in CAPABILITY: the selection option ``LIST (SPECIAL-USE) ref
  pattern`` (only special-use folders) and the return option ``LIST ref pattern RETURN
  (SPECIAL-USE)``. ``CHILDREN`` (always returned anyway) and an empty option list are accepted;
  any other option is unsupported and answered ``BAD`` like any unparseable command.

Errors: ``NotParseable`` (pymap's) for a LIST whose options are not the ones above.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pymap.parsing import Params
from pymap.parsing.command.auth import ListCommand
from pymap.parsing.commands import Commands
from pymap.parsing.exceptions import NotParseable

__all__ = ["CAPABILITY", "SPECIAL_USE", "ExtendedListCommand", "attributes_for", "commands"]

#: The capability a client looks for before sending the RFC 6154 LIST options.
CAPABILITY = b"SPECIAL-USE"

#: Folder name -> its RFC 6154 attribute (without the backslash, as pymap writes attributes).
SPECIAL_USE: dict[str, bytes] = {"Sent": b"Sent", "Drafts": b"Drafts", "Trash": b"Trash", "Junk": b"Junk"}

_OPTIONS = re.compile(rb"\(([A-Za-z\- ]*)\)")
_RETURN = re.compile(rb" RETURN \(([A-Za-z\- ]*)\)(?=\r?\n)", re.IGNORECASE)
_SELECTION_OK = frozenset({b"SPECIAL-USE"})
_RETURN_OK = frozenset({b"SPECIAL-USE", b"CHILDREN"})


def attributes_for(name: str, attrs: Sequence[bytes]) -> list[bytes]:
    """``attrs`` plus the special-use attribute of ``name`` (an exact default folder name), if any."""
    extra = SPECIAL_USE.get(name)
    return [*attrs, extra] if extra is not None and extra not in attrs else list(attrs)


def _options(raw: bytes, allowed: frozenset[bytes], buf: memoryview) -> frozenset[bytes]:
    found = frozenset(word.upper() for word in raw.split())
    if not found <= allowed:
        raise NotParseable(buf, b"Unsupported LIST option.")
    return found


class ExtendedListCommand(ListCommand):
    """pymap's LIST, plus the RFC 6154 selection and return options (see the module docstring)."""

    def __init__(self, tag: bytes, ref_name: str, filter_: str, *, special_use_only: bool = False) -> None:
        super().__init__(tag, ref_name, filter_)
        self.special_use_only = special_use_only

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[ExtendedListCommand, memoryview]:
        raw = bytes(buf)
        selection: frozenset[bytes] = frozenset()
        match = _OPTIONS.match(raw, 1) if raw[:2] == b" (" else None
        if match is not None:
            selection = _options(match.group(1), _SELECTION_OK, buf)
            raw = raw[: match.start()] + raw[match.end() :]
        ret = _RETURN.search(raw)
        if ret is not None:
            _options(ret.group(1), _RETURN_OK, buf)  # attributes are returned whatever is asked
            raw = raw[: ret.start()] + raw[ret.end() :]
        cmd, rest = ListCommand.parse(memoryview(raw), params)
        parsed = cls(cmd.tag, cmd.ref_name, cmd.filter, special_use_only=b"SPECIAL-USE" in selection)
        return parsed, rest


def commands() -> Commands:
    """pymap's command set with ``ExtendedListCommand`` in place of LIST."""
    table = Commands()
    table.register(ExtendedListCommand)
    return table
