"""The banner clinicians read: the signer as the directory knows them, honest revocation, fr/en, a part every client shows."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from gateway.crypto.result import SecurityResult
from gateway.process.banner import banner_text, failure_words, signer_name
from gateway.process.inbound import annotate

GOOD = SecurityResult(encrypted=True, decrypted_ok=True, signed=True, signature_valid=True, chain_valid=True,
                      revoked=False, from_matches_signer=True, from_address="anne.martin@a.test",
                      signer_email="anne.martin@a.test", signer_subject="CN=localhost,O=Operateur A,C=FR",
                      crl_status="good")  # fmt: skip
LABEL = "Dr Anne Martin (RPPS 10000000009)"


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def test_verified_names_the_signer_as_the_directory_knows_them_in_french_and_english() -> None:
    fr = banner_text(GOOD, label=LABEL, language="fr")
    en = banner_text(GOOD, label=LABEL, language="en")
    assert fr == "[Signé par Dr Anne Martin (RPPS 10000000009) : certificat valide, chiffré pendant le transport]"
    assert en == "[Signed by Dr Anne Martin (RPPS 10000000009): certificate valid, encrypted in transit]"
    assert "CN=" not in fr + en


@pytest.mark.parametrize(("crl", "fr", "en"), [
    ("unavailable", "révocation non vérifiée (liste de révocation indisponible)", "revocation not checked (revocation list unavailable)"),
    ("stale", "révocation non vérifiée (liste de révocation périmée)", "revocation not checked (revocation list out of date)"),
    (None, "révocation non vérifiée", "revocation not checked"),
])  # fmt: skip
def test_certificate_valid_only_when_revocation_was_checked(crl: str | None, fr: str, en: str) -> None:
    result = GOOD.evolve(crl_status=crl)
    assert fr in banner_text(result, label=LABEL, language="fr")
    english = banner_text(result, label=LABEL, language="en")
    assert en in english and "certificate valid" not in english


def test_unknown_signer_is_named_by_address_and_organisation_never_by_dn() -> None:
    assert signer_name(GOOD, None, "en") == "unknown signer <anne.martin@a.test>, certificate of Operateur A"
    assert signer_name(GOOD, None, "fr") == "signataire inconnu <anne.martin@a.test>, certificat de Operateur A"
    raw_dn = signer_name(GOOD, "CN=localhost,O=Operateur A", "en")  # a label that is a DN is not shown
    assert "CN=" not in raw_dn and "anne.martin@a.test" in raw_dn
    domain_bound = GOOD.evolve(signer_email=None)
    assert signer_name(domain_bound, None, "en") == "the operator of a.test (Operateur A)"
    assert signer_name(GOOD.evolve(signer_email=None, signer_subject="CN=x", from_address=None), None, "fr") == (
        "signataire non identifié")


def test_local_transit_and_tls_transit_are_said() -> None:
    assert banner_text(GOOD, label=LABEL, language="en", transit="local").endswith("sent within this operator]")
    assert banner_text(GOOD.evolve(encrypted=False), label=LABEL, language="fr").endswith(
        "transmis entre opérateurs par TLS authentifié]")


def test_an_openpgp_signature_is_not_called_a_valid_certificate() -> None:
    """OpenPGP has no certificate nor CRL here: the banner says what was checked, a registered key."""
    pgp = GOOD.evolve(method="pgp", crl_status=None)
    assert banner_text(pgp, label=LABEL, language="fr") == (
        "[Signé par Dr Anne Martin (RPPS 10000000009) : clé OpenPGP enregistrée dans l'annuaire, "
        "chiffré pendant le transport]")
    english = banner_text(pgp, label=LABEL, language="en")
    assert "OpenPGP key registered in the directory" in english and "certificate" not in english


def test_failures_in_words_and_a_release_says_who_delivered_it() -> None:
    unsigned = SecurityResult(encrypted=True, decrypted_ok=True).with_failure("not-signed", "x")
    text = banner_text(unsigned, language="fr")
    assert text.startswith("[NON VÉRIFIÉ : le message n'est pas signé")
    assert "Signé par" not in text
    released = banner_text(GOOD.with_failure("revoked", "x", revoked=True), language="en", released=True)
    assert "has been revoked" in released and "Released by your administrator" in released
    assert failure_words("malformed-cms", "en") == "the security check failed"
    with pytest.raises(ValueError, match="fr or en"):
        banner_text(GOOD, language="de")


def test_french_banner_in_an_ascii_plain_text_message_is_valid_utf8() -> None:
    plain = b"From: anne.martin@a.test\r\nSubject: s\r\nContent-Type: text/plain; charset=us-ascii; format=flowed\r\n\r\nBonjour\r\n"
    out = annotate(plain, GOOD, authserv_id="mx.b.test", banner=True, signer=LABEL, language="fr")
    msg = parse(out)
    assert msg.get_content_charset() == "utf-8" and msg.get_param("format") == "flowed"
    assert msg.get_content().startswith("[Signé par Dr Anne Martin") and msg.get_content().rstrip().endswith("Bonjour")
    assert msg["Content-Transfer-Encoding"] == "8bit" and not msg.defects


def test_alternative_html_is_wrapped_so_every_client_shows_the_banner() -> None:
    msg = EmailMessage()
    msg["From"] = "anne.martin@a.test"
    msg["Subject"] = "html"
    msg.set_content("texte")
    msg.add_alternative("<p>texte</p>", subtype="html")
    original = msg.as_bytes(policy=policy.SMTP)
    out = annotate(original, GOOD, authserv_id="mx.b.test", banner=True, signer=LABEL, language="en")
    got = parse(out)
    assert got.get_content_type() == "multipart/mixed" and not got.defects
    banner, alternative = list(got.iter_parts())
    assert banner.get_content_disposition() == "inline" and banner.get_content().startswith("[Signed by Dr Anne")
    assert alternative.get_content_type() == "multipart/alternative"
    assert [p.get_content().strip() for p in alternative.iter_parts()] == ["texte", "<p>texte</p>"]
    body = original.split(b"\r\n\r\n", 1)[1]
    assert body in out  # the original entity's bytes, untouched


def test_hostile_structures_never_raise_and_keep_the_original_bytes() -> None:
    """Fuzz: mutated messages (broken boundaries, odd types, NULs, huge headers) through the banner
    and the trace never raise, and the original body bytes are still in what is delivered."""
    import random

    from gateway.delivery.trace import peer_trace, with_trace

    rng = random.Random(18)
    seeds = [
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
        b"Content-Type: multipart/alternative\r\n\r\nno boundary\r\n",
        b"Content-Type: text/plain; charset=\"\xff\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n",
        b"Content-Type: text/html\r\n\r\n<p>\x00</p>\r\n",
        b"Received: x\r\n" * 300 + b"From: a\r\n\r\nbody",
        b"Content-Type: multipart/mixed; boundary=\"" + b"b" * 200 + b"\"\r\n\r\n--" + b"b" * 200 + b"\r\n",
    ]
    for _ in range(400):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(0, 6)):
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.choice([b"\r\n", b"--", b";", b"\"", b"\x00", b":", b" ", b"\xc3"])
        raw = bytes(data)
        try:
            out = annotate(raw, GOOD, authserv_id="mx.b.test", banner=True, signer=LABEL, language="fr")
        except ValueError:
            continue  # a header block the MIME splitter refuses: the pipeline quarantines such input
        delivered = with_trace(out, "anne.martin@a.test", received=peer_trace(raw))
        assert delivered.startswith(b"Return-Path: <anne.martin@a.test>")
        body = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").partition(b"\r\n\r\n")[2]
        assert body in delivered
        parse(delivered)  # Python's parser accepts what we deliver
