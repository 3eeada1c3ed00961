"""The caches and shortcuts of the open path decide exactly as the uncached code did."""

from __future__ import annotations

import base64
import datetime as dt
import os
from typing import Any

from cryptography import x509

from gateway.crypto import _mime
from gateway.crypto.smime import open_message, protect
from gateway.crypto.trust import TrustStore


def _protect(world: Any, msg: bytes) -> bytes:
    return protect(
        msg, signer_cert=world.alice.cert, signer_key=world.alice.key, recipient_certs=[world.bob.cert]
    )


def _open(data: bytes, world: Any, trust: TrustStore, **kw: Any) -> Any:
    return open_message(data, recipient_cert=world.bob.cert, recipient_key=world.bob.key, trust=trust, **kw)


def test_cached_path_still_checks_validity_at_the_requested_time(world: Any, make_message: Any) -> None:
    trust = TrustStore([world.ca], world.trust.crls)
    out = _protect(world, make_message())
    _, first = _open(out, world, trust)
    _, again = _open(out, world, trust)
    assert first.ok and again.ok and first == again
    after_expiry = world.alice.cert.not_valid_after_utc + dt.timedelta(days=1)
    _, late = _open(out, world, trust, now=after_expiry)
    assert late.failure == "expired" and not late.ok
    before = world.alice.cert.not_valid_before_utc - dt.timedelta(days=1)
    _, early = _open(out, world, trust, now=before)
    assert early.failure == "not-yet-valid" and not early.ok


def test_revocation_is_checked_on_a_cached_path(world: Any, make_message: Any) -> None:
    trust = TrustStore([world.ca])
    out = protect(make_message(from_addr="gone@a.test"), signer_cert=world.revoked.cert,
                  signer_key=world.revoked.key, recipient_certs=[world.bob.cert])  # fmt: skip
    _, res = _open(out, world, trust)
    assert res.ok and res.crl_status == "unavailable"
    for crl in world.trust.crls:
        trust.add_crl(crl)
    _, res = _open(out, world, trust)
    assert res.failure == "revoked" and res.revoked is True and not res.ok


def test_untrusted_signer_is_never_cached_as_valid(world: Any, make_message: Any) -> None:
    trust = TrustStore([world.ca])
    out = protect(make_message(from_addr=world.foreign.email), signer_cert=world.foreign.cert,
                  signer_key=world.foreign.key, recipient_certs=[world.bob.cert])  # fmt: skip
    for _ in range(2):
        _, res = _open(out, world, trust)
        assert res.failure == "untrusted-ca" and not res.ok


def test_large_message_round_trip(world: Any, make_message: Any) -> None:
    body = base64.encodebytes(os.urandom(700_000)).replace(b"\n", b"\r\n")
    msg = make_message(body=body)
    inner, res = _open(_protect(world, msg), world, world.trust)
    assert res.ok and inner == msg


def test_b64_lines_matches_encodebytes() -> None:
    for n in (0, 1, 56, 57, 58, 114, 57 * 512, 57 * 512 + 1, 57 * 1030 + 7):
        data = os.urandom(n)
        assert _mime.b64_lines(data) == base64.encodebytes(data).replace(b"\n", b"\r\n")


def test_split_entity_prefers_the_first_blank_line() -> None:
    assert _mime.split_entity(b"A: 1\n\nB: 2\r\n\r\nbody") == (b"A: 1", b"B: 2\r\n\r\nbody")
    assert _mime.split_entity(b"A: 1\r\n\r\nbody\n\nmore") == (b"A: 1", b"body\n\nmore")
    assert _mime.header_block(b"A: 1\r\n\r\nbody") == b"A: 1"


def test_content_type_params_with_quotes() -> None:
    value = 'multipart/signed; protocol="application/pkcs7-signature"; boundary="a;b"; micalg=sha-256'
    mtype, params = _mime.content_type(value)
    assert mtype == "multipart/signed" and params["boundary"] == "a;b" and params["micalg"] == "sha-256"
    assert _mime.content_type('text/plain; name="x\\";y"; a=b')[1] == {"name": 'x";y', "a": "b"}


def test_carried_certificates_are_shared_between_messages(world: Any, make_message: Any) -> None:
    from gateway.crypto import cms

    out = _protect(world, make_message())
    _open(out, world, world.trust)
    before = cms._carried_cert.cache_info().hits
    _, res = _open(_protect(world, make_message()), world, world.trust)
    assert res.ok and cms._carried_cert.cache_info().hits > before
    assert isinstance(cms._carried_cert(world.alice.cert.public_bytes(_der()))[1], x509.Certificate)


def _der() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER
