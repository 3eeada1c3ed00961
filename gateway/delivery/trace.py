"""Trace fields of a delivered message: ``Return-Path`` and the ``Received`` fields of every hop.

RFC 5321 §4.4: each SMTP server that receives a message prepends a ``Received`` field, and the
final delivery adds ``Return-Path`` (the envelope's reverse-path) at the top, removing any the
message carried. Mail clients and tools (getmail's ``<unknown>`` sender, a reply to a bounce,
``mutt``'s envelope view) read them to know who sent what, and through which hops.

A message from a peer operator is encrypted: the ``Received`` field our inbound listener wrote for
the peer hop sits on the outer (encrypted) message, which decryption throws away. ``peer_trace``
takes the leading trace fields of the received bytes so that ``with_trace`` can put them back on
top of the original, in the order RFC 5321 §4.4 keeps (newest first). Our own submission's
``Received`` is already in the original, written by the submission listener, and so is the
sender's operator's (it was encrypted with the message).

Errors: none raised; bytes whose header block cannot be parsed are returned with only the new
fields prepended (a delivery is never refused for its trace).
"""

from __future__ import annotations

from gateway.crypto import _mime

__all__ = ["peer_trace", "return_path", "with_trace"]

_TRACE = frozenset({"received", "return-path"})
_MAX_HOPS = 100  # RFC 5321 §6.3: a loop is assumed beyond about 100 Received fields


def return_path(sender: str) -> bytes:
    """``Return-Path: <sender>`` (``<>`` for the null reverse-path of a receipt)."""
    safe = "".join(ch for ch in sender if ch.isprintable() and ch not in "<>\r\n")
    return f"Return-Path: <{safe}>\r\n".encode()


def peer_trace(received: bytes) -> bytes:
    """The ``Received`` fields at the top of ``received`` (the bytes as our listener stored them)."""
    try:
        fields = _mime.parse_headers(_mime.header_block(received[: 256 * 1024]))
    except ValueError:
        return b""
    out: list[bytes] = []
    for name, _value, raw in fields:
        if name != "received" or len(out) >= _MAX_HOPS:
            break
        out.append(raw if raw.endswith(b"\r\n") else raw.rstrip(b"\r\n") + b"\r\n")
    return b"".join(out)


def with_trace(data: bytes, sender: str, *, received: bytes = b"") -> bytes:
    """``data`` as delivered: ``Return-Path``, then ``received`` (outer hops), then the message
    without any ``Return-Path`` of its own (a forged or stale one would name the wrong sender)."""
    try:
        block, body = _mime.split_entity(data)
        fields = _mime.parse_headers(block)
    except ValueError:
        return return_path(sender) + received + data
    kept = b"".join(raw for name, _value, raw in fields if name != "return-path")
    newline = data.find(b"\n")
    eol = b"\n" if newline >= 0 and data[newline - 1 : newline] != b"\r" else b"\r\n"
    first = return_path(sender)
    if eol == b"\n":  # keep a bare-LF message consistent (parse_headers ends its last field with CRLF)
        first, received, kept = (x.replace(b"\r\n", b"\n") for x in (first, received, kept))
    return first + received + kept + eol + body
