"""Each way an inbound S/MIME message can be wrong yields its own failure code, never a traceback."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from asn1crypto import cms as acms

from gateway.crypto import _mime
from gateway.crypto.smime import (
    _enveloped_entity,
    _outer_headers,
    _signed_entity,
    _wrap_rfc822,
    open_message,
    protect,
)
from gateway.crypto.trust import TrustStore

MakeMessage = Callable[..., bytes]


def _open(world: Any, data: bytes, **kw: Any) -> Any:
    return open_message(
        data, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=world.trust, **kw
    )


def _protect_as(world: Any, signer: Any, msg: bytes) -> bytes:
    return protect(msg, signer_cert=signer.cert, signer_key=signer.key, recipient_certs=[world.bob.cert])


def _seal(world: Any, msg: bytes, signed_entity: bytes) -> bytes:
    return _outer_headers(msg, "Message securise", None) + _enveloped_entity(signed_entity, [world.bob.cert])


def _signed_parts(world: Any, msg: bytes) -> tuple[bytes, str, list[bytes]]:
    entity = _signed_entity(_wrap_rfc822(msg), world.alice.cert, world.alice.key, ())
    block, body = _mime.split_entity(entity)
    _, params = _mime.content_type(_mime.header_value(_mime.parse_headers(block), "content-type"))
    return block, params["boundary"], _mime.split_multipart(body, params["boundary"])


def _reassemble(block: bytes, boundary: str, content: bytes, sig_der: bytes) -> bytes:
    b = boundary.encode()
    return (block + b"\r\n\r\n--" + b + b"\r\n" + content + b"\r\n--" + b + b"\r\n"
            + b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + _mime.b64_lines(sig_der) + b"\r\n--" + b + b"--\r\n")  # fmt: skip


def test_good_message_is_ok(world: Any, make_message: MakeMessage) -> None:
    msg = make_message()
    inner, res = _open(world, _protect_as(world, world.alice, msg))
    assert res.ok and res.failure is None and inner == msg
    header = res.auth_results_header("mx.b.test")
    assert header.startswith("mx.b.test; smime=pass body.smime-identifier=dr.alice@a.test (from dr.alice@a.test;")
    fields = res.audit_fields()
    assert fields["ok"] is True and fields["signer_email"] == "dr.alice@a.test"
    assert "DUPONT" not in repr(fields) and "DUPONT" not in header


def test_a_clear_message_is_its_own_inner_message(world: Any, make_message: MakeMessage) -> None:
    """Neither encrypted nor signed: what comes back is the message as received, each header field
    once (a release from quarantine delivers it, an MDN quotes its header)."""
    msg = make_message()
    inner, res = _open(world, msg)
    assert res.failure == "not-encrypted" and inner == msg
    inner, res = _open(world, msg, require_encryption=False)
    assert res.failure == "not-signed" and inner == msg
    head = _mime.parse_headers(_mime.header_block(inner))
    names = [name for name, _, _ in head]
    assert len(names) == len(set(names)), names


def test_tampered_body(world: Any, make_message: MakeMessage) -> None:
    msg = make_message()
    block, boundary, parts = _signed_parts(world, msg)
    tampered = parts[0].replace("résultats".encode(), b"resultats")
    assert tampered != parts[0]
    sig = _mime.b64decode_body(_mime.split_entity(parts[1])[1])
    _inner, res = _open(world, _seal(world, msg, _reassemble(block, boundary, tampered, sig)))
    assert res.failure == "tampered-content" and not res.ok and not res.signature_valid
    assert res.decrypted_ok


def test_tampered_signed_attribute(world: Any, make_message: MakeMessage) -> None:
    msg = make_message()
    block, boundary, parts = _signed_parts(world, msg)
    sig = _mime.b64decode_body(_mime.split_entity(parts[1])[1])
    ci = acms.ContentInfo.load(sig)
    si = ci["content"]["signer_infos"][0]
    for attr in si["signed_attrs"]:
        if attr["type"].native == "signing_time":
            attr["values"] = [acms.Time({"utc_time": dt.datetime(2001, 1, 1, tzinfo=dt.UTC)})]
            break
    else:
        pytest.fail("no signing time attribute to tamper with")
    forged = ci.dump(force=True)
    assert forged != sig
    _, res = _open(world, _seal(world, msg, _reassemble(block, boundary, parts[0], forged)))
    assert res.failure == "bad-signed-attributes" and not res.ok


def test_wrong_recipient(world: Any, make_message: MakeMessage) -> None:
    out = protect(make_message(), signer_cert=world.alice.cert, signer_key=world.alice.key,
                  recipient_certs=[world.carol.cert], encrypt_for_sender=False)  # fmt: skip
    inner, res = _open(world, out)
    assert inner is None and res.failure == "wrong-recipient" and res.encrypted is False


def test_untrusted_ca(world: Any, make_message: MakeMessage) -> None:
    _, res = _open(world, _protect_as(world, world.foreign, make_message()))
    assert res.failure == "untrusted-ca" and res.signature_valid and not res.chain_valid and not res.ok


def test_expired_signer(world: Any, make_message: MakeMessage) -> None:
    _, res = _open(world, _protect_as(world, world.expired, make_message(from_addr="old@a.test")))
    assert res.failure == "expired" and res.signature_valid and not res.ok


def test_not_yet_valid_signer(world: Any, make_message: MakeMessage) -> None:
    _, res = _open(world, _protect_as(world, world.future, make_message(from_addr="soon@a.test")))
    assert res.failure == "not-yet-valid" and not res.ok


def test_revoked_signer(world: Any, make_message: MakeMessage) -> None:
    out = _protect_as(world, world.revoked, make_message(from_addr="gone@a.test"))
    _, res = _open(world, out)
    assert res.failure == "revoked" and res.revoked is True and res.crl_status == "revoked" and not res.ok
    # Without the CRL the same message passes, flagged as unchecked.
    _inner, res2 = open_message(out, recipient_cert=world.bob.cert, recipient_key=world.bob.key,
                               trust=TrustStore([world.ca]))  # fmt: skip
    assert res2.ok and res2.crl_status == "unavailable" and res2.revoked is None


def test_stale_crl_is_soft_unless_required(world: Any, make_message: MakeMessage) -> None:
    out = _protect_as(world, world.alice, make_message())
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=9)
    _, res = _open(world, out, now=later)
    assert res.ok and res.crl_status == "stale"
    strict = TrustStore([world.ca], world.trust.crls, require_crl=True)
    _, res = open_message(
        out, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=strict, now=later
    )
    assert res.failure == "crl-stale" and not res.ok


def test_from_mismatch(world: Any, make_message: MakeMessage) -> None:
    _, res = _open(
        world, _protect_as(world, world.alice, make_message(from_addr="Dr Mallory <mallory@a.test>"))
    )
    assert res.failure == "from-mismatch" and res.from_matches_signer is False and res.chain_valid
    assert res.from_address == "mallory@a.test"


def test_truncated_cms(world: Any, make_message: MakeMessage) -> None:
    out = _protect_as(world, world.alice, make_message())
    block, body = _mime.split_entity(out)
    lines = body.split(b"\r\n")
    truncated = block + b"\r\n\r\n" + b"\r\n".join(lines[: len(lines) // 2]) + b"\r\n"
    inner, res = _open(world, truncated)
    assert inner is None and res.failure == "malformed-cms"


@pytest.mark.parametrize("payload", [
    b"", b"\x00" * 10, os.urandom(5000), b"\x30\x80" * 50_000, b"\x30\x82\xff\xff" + b"\x00" * 100,
])  # fmt: skip
def test_garbage_cms(world: Any, payload: bytes) -> None:
    data = (b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" + _mime.b64_lines(payload))  # fmt: skip
    inner, res = _open(world, data)
    assert inner is None and res.failure == "malformed-cms" and not res.ok


def test_garbage_mime(world: Any) -> None:
    for data in (os.urandom(20_000), b"Content-Type: multipart/signed; boundary=x\r\n\r\n--x\r\nno end",
                 b"\r\n\r\n", b"Content-Type: application/pkcs7-mime\r\nContent-Transfer-Encoding: base64\r\n\r\n!!"):  # fmt: skip
        _inner, res = _open(world, data, require_encryption=False)
        assert res.failure in ("malformed-cms", "not-signed") and not res.ok


def test_huge_nested_mime_is_bounded(world: Any) -> None:
    depth = 20_000
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth)
    )
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    data = b"From: x@a.test\r\n" + head + b"Content-Type: text/plain\r\n\r\nx" + tail
    start = time.monotonic()
    _, res = _open(world, data)
    assert res.failure == "not-encrypted" and not res.ok
    assert time.monotonic() - start < 2
    _, res = _open(world, data, max_size=len(data) - 1)
    assert res.failure == "too-large"
