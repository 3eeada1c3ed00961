"""Authentication-Results and banner on delivered inbound mail: simple cases only, attachments untouched."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

from gateway.crypto.result import SecurityResult
from gateway.process.inbound import annotate

OK = SecurityResult(encrypted=True, decrypted_ok=True, signed=True, signature_valid=True, chain_valid=True,
                    revoked=False, from_matches_signer=True, from_address="dr@a.test", signer_email="dr@a.test",
                    signer_subject="CN=Dr Martin,O=A,C=FR", crl_status="good")  # fmt: skip


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


def test_plain_text_gets_header_and_banner_and_forged_results_are_removed() -> None:
    inner = (b"Authentication-Results: mx.b.test; smime=pass (forged)\r\n"
             b"Authentication-Results: other.test; dkim=pass\r\n"
             b"From: dr@a.test\r\nSubject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBonjour\r\n")  # fmt: skip
    out = annotate(inner, OK, authserv_id="mx.b.test", banner=True)
    msg = parse(out)
    results = msg.get_all("Authentication-Results")
    assert len(results) == 2 and "forged" not in str(results)
    ours = str(results[0])
    assert ours.startswith("mx.b.test;") and "smime=pass" in ours and "body.smime-identifier=dr@a.test" in ours
    assert all(len(line) <= 78 for line in out.split(b"\r\n\r\n")[0].split(b"\r\n"))
    body = msg.get_content()
    assert body.startswith("[Signed by ") and body.rstrip().endswith("Bonjour")


def test_multipart_mixed_gets_a_first_text_part_attachment_intact() -> None:
    msg = EmailMessage()
    msg["From"] = "dr@a.test"
    msg["Subject"] = "rx"
    msg.set_content("texte")
    pdf = b"%PDF-1.4 " + bytes(range(256)) * 4
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="o.pdf")
    out = parse(annotate(msg.as_bytes(policy=policy.SMTP), OK, authserv_id="mx.b.test", banner=True))
    parts = list(out.iter_parts())
    assert parts[0].get_content().startswith("[Signed by ")
    assert parts[1].get_content().strip() == "texte"
    assert next(p for p in out.iter_parts() if p.get_content_type() == "application/pdf").get_content() == pdf
    assert not out.defects


def test_other_structures_are_wrapped_and_a_failure_is_said_in_words() -> None:
    """Base64 text (which a prefix would corrupt) keeps its bytes as the second part of a new
    multipart/mixed whose first part is the banner; a failed check gets a banner saying so."""
    b64 = b"From: dr@a.test\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nQm9uam91cg==\r\n"
    out = annotate(b64, OK, authserv_id="mx.b.test", banner=True)
    assert b"\r\n\r\nQm9uam91cg==\r\n" in out
    msg = parse(out)
    assert msg.get_content_type() == "multipart/mixed" and not msg.defects
    banner, original = list(msg.iter_parts())
    assert banner.get_content().startswith("[Signed by ") and original.get_content() == "Bonjour"
    failed = OK.with_failure("from-mismatch", "x")
    plain = b"From: dr@a.test\r\n\r\nBonjour\r\n"
    out = annotate(plain, failed, authserv_id="mx.b.test", banner=True)
    assert out.endswith(b"\r\n\r\nBonjour\r\n") and b"smime=policy" in out  # verified, From not the signer's
    text = parse(out).get_content()
    assert text.startswith("[NOT VERIFIED: the signer is not the sender shown in From.") and "Signed by" not in text
