"""The inbound listener for peer operators: STARTTLS, mutual TLS, trust list, our mailboxes, dedupe."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509
from smtp_world import DOMAIN, CertFiles, World, message

pytestmark = pytest.mark.asyncio


async def peer(world: World, cert: CertFiles | None) -> aiosmtplib.SMTP:
    smtp = world.client("inbound", cert=cert)
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo()
    return smtp


async def cmd(smtp: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    verb, _, arg = line.partition(" ")
    response = await smtp.execute_command(verb.encode(), arg.encode())
    return response.code, response.message


async def test_starttls_required_and_no_auth(world: World) -> None:
    smtp = world.client("inbound")
    await smtp.connect()
    response = await smtp.ehlo()
    assert "AUTH" not in response.message
    assert await cmd(smtp, "MAIL FROM:<doc@b.mssante.test>") == (530, "5.7.0 Must issue a STARTTLS command first")
    await smtp.starttls(server_hostname="localhost")
    response = await smtp.ehlo()
    assert "AUTH" not in response.message
    await smtp.quit()


async def test_client_certificate_required(world: World) -> None:
    smtp = await peer(world, None)
    code, text = await cmd(smtp, "MAIL FROM:<doc@b.mssante.test>")
    assert (code, text[:5]) == (530, "5.7.0") and "certificate" in text
    await smtp.quit()


async def test_certificate_of_untrusted_ca_refused(world: World) -> None:
    smtp = world.client("inbound", cert=world.certs.foreign)
    await smtp.connect()
    with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, ConnectionError)):
        await smtp.starttls(server_hostname="localhost")
        await smtp.ehlo()  # TLS 1.3: the server's verdict arrives with the first read
        await smtp.mail("doc@b.mssante.test")
    assert world.gateway.store is not None and world.gateway.store.list() == []


async def test_certificate_must_match_the_sending_domain(world: World) -> None:
    smtp = await peer(world, world.certs.peer_c)  # c's operator, claiming to send for b
    code, text = await cmd(smtp, "MAIL FROM:<doc@b.mssante.test>")
    assert (code, text[:5]) == (550, "5.7.1") and "does not belong to the operator of b.mssante.test" in text
    code, text = await cmd(smtp, "MAIL FROM:<someone@gmail.com>")
    assert (code, text[:5]) == (550, "5.7.1") and "not in the trust list" in text
    await smtp.quit()


async def test_trusted_peer_accepted_and_deduplicated(world: World) -> None:
    store = world.gateway.store
    assert store is not None
    ids = []
    for _ in range(2):  # the peer resends after a lost acknowledgement
        smtp = await peer(world, world.certs.peer_b)
        assert (await cmd(smtp, "MAIL FROM:<doc@b.mssante.test>"))[0] == 250
        code, text = await cmd(smtp, "RCPT TO:<doc@b.mssante.test>")  # not ours: no relaying
        assert (code, text[:5]) == (550, "5.7.1")
        assert (await cmd(smtp, f"RCPT TO:<old@{DOMAIN}>"))[0] == 550
        assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
        response = await smtp.data(message(sender="doc@b.mssante.test", message_id="<peer-1@b.mssante.test>"))
        assert response.code == 250
        ids.append(response.message.rsplit(" ", 1)[1])
        await smtp.quit()
    assert ids[0] == ids[1]
    rows = store.list()
    assert [r["id"] for r in rows] == [ids[0]]
    row = store.get(ids[0])
    assert row["origin"] == "inbound" and row["peer_operator"] == "b.mssante.test"
    assert row["message_id"] == "<peer-1@b.mssante.test>"


def dsn(message_id: str) -> bytes:
    return (f"From: MAILER-DAEMON@mx.b.mssante.test\r\nTo: bob@{DOMAIN}\r\nSubject: Delivery Status Notification\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMessage-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n"
            "--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.b.mssante.test\r\n\r\n"
            "Final-Recipient: rfc822; doc@b.mssante.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            "--b1--\r\n").encode()


async def test_null_sender_from_trusted_peer_accepted(world: World) -> None:
    store = world.gateway.store
    assert store is not None
    smtp = await peer(world, world.certs.peer_b)
    assert (await cmd(smtp, "MAIL FROM:<> SIZE=1000"))[0] == 250
    assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
    response = await smtp.data(dsn("<dsn-1@mx.b.mssante.test>"))
    assert response.code == 250
    await smtp.quit()
    queue_id = response.message.rsplit(" ", 1)[1]
    row = store.get(queue_id)
    assert row["sender"] == "<>" and row["peer_operator"] == "b.mssante.test" and row["origin"] == "inbound"
    # a null sender from a peer whose certificate names no trusted domain is refused
    smtp = await peer(world, world.certs.app)
    code, text = await cmd(smtp, "MAIL FROM:<>")
    assert (code, text[:5]) == (550, "5.7.1") and "not in the trust list" in text
    await smtp.quit()


async def test_revoked_peer_certificate_refused(world: World, tmp_path: Path) -> None:
    from certs.pki import issue_certificate, load_dev_pki, revoke_certificate, save_certificate_and_key

    pki = load_dev_pki(world.home / "pki")
    cert, key = issue_certificate(pki, kind="operator", dns_names=["mx.b.mssante.test", "b.mssante.test"],
                                  organization="Operateur B")
    files = CertFiles(tmp_path / "revoked.pem", tmp_path / "revoked.key")
    save_certificate_and_key(cert, key, files.cert, files.key)
    revoke_certificate(pki, cert.serial_number, x509.ReasonFlags.key_compromise)
    for sender in ("doc@b.mssante.test", ""):
        smtp = await peer(world, files)
        code, text = await cmd(smtp, f"MAIL FROM:<{sender}>")
        assert (code, text[:5]) == (550, "5.7.1") and "revoked" in text, text
        await smtp.quit()
    assert world.gateway.store is not None and world.gateway.store.list() == []
    smtp = await peer(world, world.certs.peer_b)  # the operator's other certificate is still good
    assert (await cmd(smtp, "MAIL FROM:<doc@b.mssante.test>"))[0] == 250
    await smtp.quit()
