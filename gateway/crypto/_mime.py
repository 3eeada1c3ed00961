"""Minimal, byte-exact MIME helpers for the S/MIME and PGP/MIME wrappers.

The job: split headers from bodies, read a few header fields and cut multipart bodies on their
boundaries without re-serialising anything, because a signature covers bytes (RFC 8551 §3.1,
RFC 1847 §2.1, RFC 3156 §5).  Python's `email` package is deliberately not used on the hot
path: it re-folds headers, rewrites line endings, and costs several times the crypto.

Errors: `MimeError` (a subclass of ValueError) for anything that is not well-formed enough to
locate the parts we need; limits on header size and part count bound the work on hostile input.
"""

from __future__ import annotations

import binascii
import functools
import re
import secrets
import struct
from email.utils import getaddresses

from gateway.core.errors import CryptoError
from gateway.policy.limits import MAX_HEADER_BYTES, MAX_HEADER_FIELDS, MAX_PARTS

__all__ = [
    "MAX_HEADER_BYTES",
    "MimeError",
    "b64_lines",
    "b64decode_body",
    "content_type",
    "first_address",
    "header_block",
    "header_value",
    "new_boundary",
    "parse_headers",
    "split_entity",
    "split_multipart",
    "to_crlf",
]

# MAX_HEADER_BYTES, MAX_HEADER_FIELDS, MAX_PARTS: the bounds the SMTP edge checks at DATA, from
# one place (gateway.policy.limits), so a message accepted there never fails here for its shape.

_FOLD = re.compile(r"\r?\n[ \t]")
_QUOTED_PAIR = re.compile(r"\\(.)")


class MimeError(CryptoError, ValueError):
    """The bytes are not a MIME entity we can take apart."""


def to_crlf(data: bytes) -> bytes:
    """Canonical line endings (RFC 8551 §3.1.1): every bare LF becomes CRLF; CRLF is left alone."""
    lf = data.count(b"\n")
    if lf == 0 or lf == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _entity_bounds(data: bytes) -> tuple[int, int]:
    """(end of the header block, start of the body) of a MIME entity; LF or CRLF accepted."""
    if data.startswith(b"\r\n"):
        return 0, 2
    if data.startswith(b"\n"):
        return 0, 1
    limit = min(len(data), MAX_HEADER_BYTES)
    # The first blank line ends the header block.  Look for CRLF CRLF first, then for LF LF only
    # before it: a CRLF message is never scanned up to the limit for a bare LF LF it lacks.
    i = data.find(b"\r\n\r\n", 0, limit)
    j = data.find(b"\n\n", 0, limit if i < 0 else i + 1)
    if j >= 0 and (i < 0 or j < i):
        return j, j + 2
    if i >= 0:
        return i, i + 4
    if len(data) >= MAX_HEADER_BYTES:
        raise MimeError("header block too large or not terminated")
    return len(data), len(data)


def split_entity(data: bytes) -> tuple[bytes, bytes]:
    """Return (header block without the blank line, body) of a MIME entity; LF or CRLF accepted."""
    end, body = _entity_bounds(data)
    return data[:end], data[body:]


def header_block(data: bytes) -> bytes:
    """The header block of `split_entity(data)`, without copying the body."""
    return data[: _entity_bounds(data)[0]]


def parse_headers(block: bytes) -> list[tuple[str, str, bytes]]:
    """[(lower-case name, unfolded value, raw field bytes with its line ending)] in order."""
    out: list[tuple[str, str, bytes]] = []
    lines = block.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\r\n"
    current: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        if current:
            out.append(_field(current))
        current = [line]
        if len(out) > MAX_HEADER_FIELDS:
            raise MimeError("too many header fields")
    if current:
        out.append(_field(current))
    return out


def _field(lines: list[bytes]) -> tuple[str, str, bytes]:
    raw = b"".join(lines)
    name, sep, value = raw.partition(b":")
    if not sep or not name.strip() or b" " in name.strip():
        raise MimeError("malformed header field")
    text = value.decode("utf-8", "replace")
    if "\n" in text[:-1]:  # folded: unfold (RFC 5322 §2.2.3); a single field line needs no regex
        text = _FOLD.sub(" ", text)
    text = text.strip()
    return name.strip().decode("ascii", "replace").lower(), text, raw


def header_value(fields: list[tuple[str, str, bytes]], name: str) -> str | None:
    name = name.lower()
    for n, v, _ in fields:
        if n == name:
            return v
    return None


def content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """(lower-case type/subtype, {lower-case param: value}); default text/plain (RFC 2045 §5.2)."""
    if not value:
        return "text/plain", {}
    parts = _split_params(value)
    mtype = parts[0].strip().lower() or "text/plain"
    params: dict[str, str] = {}
    for p in parts[1:]:
        k, sep, v = p.partition("=")
        if not sep:
            continue
        v = v.strip()
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = _QUOTED_PAIR.sub(r"\1", v[1:-1])
        params[k.strip().lower()] = v
    return mtype, params


def _split_params(value: str) -> list[str]:
    if "\\" not in value:
        # Without quoted-pairs, the text between quotes alternates outside/inside a quoted-string
        # (an unterminated quote runs to the end); only an outside ';' separates parameters.
        out = [""]
        for i, seg in enumerate(value.split('"')):
            if i:
                out[-1] += '"'
            if i % 2:
                out[-1] += seg
            else:
                first, *rest = seg.split(";")
                out[-1] += first
                out.extend(rest)
        return out
    out, buf, quoted, escape = [], [], False, False
    for ch in value:
        if escape:
            buf.append(ch)
            escape = False
        elif ch == "\\" and quoted:
            buf.append(ch)
            escape = True
        elif ch == '"':
            buf.append(ch)
            quoted = not quoted
        elif ch == ";" and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return out


def split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """Body parts of a multipart body, byte-exact (RFC 2046 §5.1.1: the CRLF before a delimiter
    belongs to the delimiter).  Raises MimeError when the closing delimiter is missing."""
    if not boundary or len(boundary) > 70:
        raise MimeError("missing or invalid multipart boundary")
    dash = b"--" + boundary.encode("ascii", "strict")
    parts: list[bytes] = []
    start: int | None = None
    pos = 0
    while True:
        i = body.find(dash, pos)
        if i < 0:
            raise MimeError("multipart body has no closing delimiter")
        pos = i + len(dash)
        # A delimiter starts a line; the line break before it belongs to the delimiter.
        if i == 0:
            begin = 0
        elif body[i - 1 : i] == b"\n":
            begin = i - 2 if body[i - 2 : i] == b"\r\n" else i - 1
        else:
            continue
        closing = body[pos : pos + 2] == b"--"
        j = pos + 2 if closing else pos
        eol = body.find(b"\n", j)
        rest = body[j:] if eol < 0 else body[j:eol].rstrip(b"\r")
        if rest.strip(b" \t"):
            continue  # the boundary text is only the prefix of a longer line
        if start is not None:
            parts.append(body[start:begin])
            if len(parts) > MAX_PARTS:
                raise MimeError("too many body parts")
        if closing:
            return parts
        start = len(body) if eol < 0 else eol + 1
        pos = start


def new_boundary(*contents: bytes) -> str:
    """A random boundary that does not occur in any of `contents`."""
    while True:
        b = "=_mssgw_" + secrets.token_hex(16)
        if all(b.encode() not in c for c in contents):
            return b


_B64_LINE = 76
_B64_BLOCK = 512
_B64_BLOCK_STRUCT = struct.Struct(f"{_B64_LINE}s" * _B64_BLOCK)


def b64_lines(data: bytes) -> bytes:
    """Base64 in 76-character CRLF-terminated lines (RFC 2045 §6.8).

    Encoded in one call; the lines are cut by `struct` in blocks of 512, so a megabyte costs a
    few dozen Python iterations rather than one per line."""
    enc = binascii.b2a_base64(data, newline=False)
    whole = len(enc) // _B64_LINE
    lines: list[bytes] = []
    pos = 0
    stop = (whole - whole % _B64_BLOCK) * _B64_LINE
    while pos < stop:
        lines.extend(_B64_BLOCK_STRUCT.unpack_from(enc, pos))
        pos += _B64_BLOCK * _B64_LINE
    if whole % _B64_BLOCK:
        lines.extend(struct.unpack_from(f"{_B64_LINE}s" * (whole % _B64_BLOCK), enc, pos))
        pos = whole * _B64_LINE
    if pos < len(enc):
        lines.append(enc[pos:])
    lines.append(b"")
    return b"\r\n".join(lines)


def b64decode_body(body: bytes) -> bytes:
    try:
        # Non-alphabet characters (line breaks, spaces) are discarded, as RFC 2045 §6.8 requires.
        return binascii.a2b_base64(body)
    except (binascii.Error, ValueError) as exc:
        raise MimeError("invalid base64 body") from exc


def first_address(value: str | None) -> str | None:
    """The single address of a From field, lower-cased; None if absent or not exactly one."""
    if not value:
        return None
    return _first_address(value)


@functools.lru_cache(maxsize=1024)
def _first_address(value: str) -> str | None:
    # email.utils' address parser costs more than the rest of opening a small message's MIME;
    # a gateway sees the same few From values again and again.
    addrs = [a for _, a in getaddresses([value]) if a]
    if len(addrs) != 1 or "@" not in addrs[0]:
        return None
    return addrs[0].strip().lower()
