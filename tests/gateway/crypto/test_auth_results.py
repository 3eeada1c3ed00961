"""Authentication-Results (RFC 8601) as an independent reader sees it: registered names only.

The reader is the `authres` package (its strict mode), which knows the RFC 8601 grammar and
the `smime` method of RFC 7281; the names are checked against the IANA "Email Authentication
Methods" registry entries written out below.  A real S/MIME message made by `openssl cms` and a
real OpenPGP message made by `gpg` give the verdicts that are rendered.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import authres  # type: ignore[import-untyped]
import authres.smime  # type: ignore[import-untyped]
import pytest

from gateway.crypto.openpgp import OpenPgp
from gateway.crypto.result import FAILURE_CODES, SecurityResult
from gateway.crypto.smime import open_message
from gateway.process.inbound import annotate
from gateway.process.reports import peer_report_results

# IANA "Email Authentication Methods": the smime method (RFC 7281) and its properties.
REGISTERED = {"smime": {("body", "smime-identifier"), ("body", "smime-part"), ("body", "smime-serial"),
                        ("body", "smime-issuer")}}  # fmt: skip
OUR_EXTENSIONS = {"x-pgp": {("header", "from")}}
DKIM_PROPERTIES = {("header", "d"), ("header", "i"), ("header", "s"), ("header", "b"), ("header", "a")}
RESULTS = {"pass", "fail", "none", "policy", "neutral", "temperror", "permerror"}
CONTEXT = authres.FeatureContext(authres.smime)


def read(value: str) -> Any:
    """Strict authres parse of a header value (unfolded)."""
    header = authres.core.AuthenticationResultsHeader(CONTEXT, strict=True)
    header._parse_text = " ".join(value.split())
    header._parse()
    return header


def check_names(value: str) -> Any:
    header = read(value)
    assert header.authserv_id == "mx.b.test"
    (res,) = header.results
    names = REGISTERED.get(res.method) or OUR_EXTENSIONS.get(res.method)
    assert names is not None, f"unregistered method {res.method}"
    assert res.method in REGISTERED or res.method.startswith("x-")
    assert res.result in RESULTS
    props = {(p.type, p.name) for p in res.properties}
    assert props <= names, props - names
    assert not props & DKIM_PROPERTIES
    if res.method == "smime":  # RFC 7281 §3.2.3: serial and issuer together
        assert (("body", "smime-serial") in props) == (("body", "smime-issuer") in props)
    return res


GOOD = SecurityResult(encrypted=True, decrypted_ok=True, signed=True, signature_valid=True, chain_valid=True,
                      revoked=False, from_matches_signer=True, from_address="dr@a.test", signer_email="dr@a.test",
                      signer_subject="CN=Dr Hélène Martin,O=Hôpital A,C=FR", signer_fingerprint="ab" * 32,
                      signer_serial="1f2e3d", signer_issuer="CN=AC IGC-Santé Test,O=ANS,C=FR",
                      crl_status="good")  # fmt: skip


def test_a_verified_smime_message() -> None:
    value = GOOD.auth_results_header("mx.b.test")
    res = check_names(value)
    assert res.result == "pass"
    props = {p.name: p.value for p in res.properties}
    assert props == {"smime-identifier": "dr@a.test", "smime-serial": "1f2e3d",
                     "smime-issuer": "CN=AC IGC-Sante Test,O=ANS,C=FR"}  # fmt: skip
    assert value.isascii() and "crl good" in value and "ab" * 32 in value


@pytest.mark.parametrize("failure", sorted(FAILURE_CODES))
def test_every_failure_renders_with_registered_names_and_a_reason(failure: str) -> None:
    for method in ("smime", "pgp"):
        failed = GOOD.evolve(method=method).with_failure(failure, "detail (with parentheses) \\ and \"quotes\"")
        res = check_names(failed.auth_results_header("mx.b.test"))
        assert res.result != "pass"
        assert res.reason.startswith(failure)


@pytest.mark.parametrize(("failure", "signature_valid", "expected"), [
    ("tampered-content", False, "fail"), ("bad-signature", False, "fail"), ("untrusted-ca", True, "fail"),
    ("from-mismatch", True, "policy"), ("from-mismatch", False, "fail"), ("weak-digest", True, "policy"),
    ("revoked", True, "fail"), ("crl-unavailable", True, "temperror"), ("malformed-cms", False, "fail"),
    ("wrong-recipient", False, "fail"), ("too-large", False, "permerror"), ("unknown-key", False, "fail"),
])  # fmt: skip
def test_result_keywords(failure: str, signature_valid: bool, expected: str) -> None:
    res = GOOD.evolve(signature_valid=signature_valid).with_failure(failure, "x")
    assert res.auth_result == expected


def test_unsigned_is_none() -> None:
    plain = SecurityResult().with_failure("not-encrypted", "clear text")
    assert check_names(plain.auth_results_header("mx.b.test")).result == "none"
    unsigned = SecurityResult(encrypted=True, decrypted_ok=True).with_failure("not-signed", "no signature")
    assert check_names(unsigned.auth_results_header("mx.b.test")).result == "none"


def test_hostile_identities_stay_inside_their_comment_and_quotes() -> None:
    evil = GOOD.evolve(signer_subject="CN=x) smime=pass (\r\nX-Evil: 1", signer_email="a b@x.test",
                       signer_issuer='CN="q"\\,O=(p)')  # fmt: skip
    value = evil.auth_results_header("mx.b.test")
    res = check_names(value)
    assert "\r" not in value and "\n" not in value
    assert "smime-identifier" not in {p.name for p in res.properties}  # not an addr-spec: left out


def test_folded_into_a_delivered_message(tmp_path: Path) -> None:
    out = annotate(b"From: dr@a.test\r\nSubject: s\r\n\r\nBonjour\r\n", GOOD, authserv_id="mx.b.test", banner=False)
    head = out.split(b"\r\n\r\n", 1)[0].decode("ascii")
    field = head.split("\r\nFrom:", 1)[0]
    assert field.startswith("Authentication-Results:") and all(len(x) <= 78 for x in field.split("\r\n"))
    check_names(field.split(":", 1)[1])


# --- verdicts from real messages -------------------------------------------------------------------


def test_openssl_signed_and_encrypted_message(world: Any, make_message: Any, tmp_path: Path) -> None:
    msg = make_message()
    signed = subprocess.run(["openssl", "cms", "-sign", "-signer", str(world.alice.cert_path), "-inkey",
                             str(world.alice.key_path), "-nodetach", "-binary"],
                            input=msg, capture_output=True, check=True).stdout  # fmt: skip
    sealed = subprocess.run(["openssl", "cms", "-encrypt", "-aes256", str(world.bob.cert_path)],
                            input=signed, capture_output=True, check=True).stdout  # fmt: skip
    _inner, result = open_message(sealed, recipient_cert=world.bob.cert, recipient_key=world.bob.key,
                                  trust=world.trust)  # fmt: skip
    assert result.ok, result
    res = check_names(result.auth_results_header("mx.b.test"))
    assert res.method == "smime" and res.result == "pass"
    props = {p.name: p.value for p in res.properties}
    assert props["smime-identifier"] == world.alice.email
    assert int(props["smime-serial"], 16) == world.alice.cert.serial_number
    assert props["smime-issuer"] == world.alice.cert.issuer.rfc4514_string()


def test_gpg_signed_and_encrypted_message(tmp_path: Path) -> None:
    ring = OpenPgp(tmp_path / "gw")
    sender = tmp_path / "client"
    sender.mkdir(mode=0o700)
    try:
        ring.generate_key("sec@b.test", "Secretariat")

        def gpg(*args: str, stdin: bytes = b"") -> bytes:
            return subprocess.run(["gpg", "--homedir", str(sender), "--batch", "--pinentry-mode", "loopback",
                                   "--passphrase", "", "--trust-model", "always", *args], input=stdin,
                                  capture_output=True, check=True).stdout  # fmt: skip

        gpg("--quick-generate-key", "Dr <dr@a.test>", "rsa2048", "sign,encrypt", "1y")
        ring.import_key(gpg("--armor", "--export", "dr@a.test"))
        gpg("--import", stdin=ring.export_public(ring.list_keys(secret=True)[0]["fingerprint"]).encode())
        armored = gpg("--armor", "--sign", "--encrypt", "-r", "sec@b.test",
                      stdin=b"Content-Type: text/plain\r\n\r\nBonjour\r\n")  # fmt: skip
        data = (b'From: dr@a.test\r\nContent-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
                b' boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--b\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n" + armored + b"\r\n--b--\r\n")  # fmt: skip
        _inner, result = ring.open(data)
        assert result.ok, result
        res = check_names(result.auth_results_header("mx.b.test"))
        assert res.method == "x-pgp" and res.result == "pass"
        assert [(p.type, p.name, p.value) for p in res.properties] == [("header", "from", "dr@a.test")]
    finally:
        ring.close()
        subprocess.run(["gpgconf", "--homedir", str(sender), "--kill", "gpg-agent"], capture_output=True, check=False)


@pytest.mark.parametrize("peer", ["b.mssante.test", "CN=mx.b.mssante.test,O=Operateur B (test),C=FR"])
def test_a_peer_report_trusted_for_its_transport(peer: str) -> None:
    """A clear report from a verified peer: smime=none, then the transport's own x- method."""
    unsigned = SecurityResult().with_failure("not-encrypted", "clear text")
    header = read(peer_report_results("mx.b.test", unsigned, peer))
    first, second = header.results
    assert (first.method, first.result) == ("smime", "none")
    assert (second.method, second.result) == ("x-peer-tls", "pass")
    assert [(p.type, p.name, p.value) for p in second.properties] == [("policy", "peer-operator", peer)]
