"""Submission listeners against real clients (aiosmtplib, smtplib, swaks) over real TLS on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import re
import smtplib
from email import message_from_bytes

import aiosmtplib
import pytest
from click.testing import CliRunner
from smtp_world import DOMAIN, PASSWORD, World, message
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from cli.main import cli
from gateway.audit.trail import query

pytestmark = pytest.mark.asyncio


async def cmd(smtp: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    verb, _, arg = line.partition(" ")
    response = await smtp.execute_command(verb.encode(), *([arg.encode()] if arg else []))
    return response.code, response.message


async def send_data(smtp: aiosmtplib.SMTP, data: bytes) -> tuple[int, str]:
    try:
        response = await smtp.data(data)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return response.code, response.message


def queue_id_of(text: str) -> str:
    match = re.search(r"queued as ([0-9a-f]{32})", text)
    assert match, text
    return match.group(1)


async def test_auth_only_after_starttls(world: World) -> None:
    smtp = world.client()
    await smtp.connect()
    code, text = await cmd(smtp, "EHLO client.test")
    assert code == 250 and "STARTTLS" in text and "AUTH" not in text
    assert (await cmd(smtp, "AUTH PLAIN AHNlY0BhAHg="))[0] == 530
    assert await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>") == (530, "5.7.0 Must issue a STARTTLS command first")
    await smtp.starttls(server_hostname="localhost")
    code, text = await cmd(smtp, "EHLO client.test")
    assert "AUTH LOGIN PLAIN" in text and "8BITMIME" in text and "SMTPUTF8" in text
    assert "ENHANCEDSTATUSCODES" in text
    assert await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>") == (530, "5.7.0 authentication required to submit mail")
    await smtp.quit()


async def test_swaks_end_to_end_queues_durably(world: World) -> None:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(world.port("submission")), "-tls", "--tls-verify",
        "--tls-ca-path", str(world.ca), "--auth", "PLAIN", "--auth-user", f"sec@{DOMAIN}",
        "--auth-password", PASSWORD, "--from", f"sec@{DOMAIN}", "--to", f"bob@{DOMAIN}",
        "--h-From", f"sec@{DOMAIN}", "--body", "Compte rendu joint.",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out
    queue_id = queue_id_of(out)
    assert world.gateway.store is not None
    row = world.gateway.store.get(queue_id)
    stored = world.gateway.store.read(queue_id)
    assert row["sha256"] == hashlib.sha256(stored).hexdigest() and row["size"] == len(stored)
    assert row["auth_identity"] == f"sec@{DOMAIN}" and row["origin"] == "submission"
    assert [r["address"] for r in row["recipient_states"]] == [f"bob@{DOMAIN}"]
    assert stored.startswith(b"Received: from ") and f"id {queue_id}".encode() in stored
    assert b"Compte rendu joint." in stored
    # The audit trail saw the whole transaction, without content.
    assert world.gateway.audit is not None
    await world.gateway.audit.flush()
    with world.gateway.sessions() as db:  # type: ignore[misc]
        records = query(db, limit=100)
    events = {(r["event"], r["outcome"]) for r in records}
    assert {("connect", "info"), ("auth", "accept"), ("mail", "accept"), ("rcpt", "accept"),
            ("accept", "accept")} <= events
    accept = next(r for r in records if r["event"] == "accept")
    assert accept["queue_id"] == queue_id and accept["recipient"] == f"bob@{DOMAIN}"
    assert all("Compte rendu" not in str(r) and "test " not in str(r.get("detail")) for r in records)


async def test_implicit_tls_submission(world: World) -> None:
    smtp = world.client("submissions")
    await smtp.connect()
    _, text = await cmd(smtp, "EHLO client.test")
    assert "AUTH LOGIN PLAIN" in text and "STARTTLS" not in text
    await smtp.login(f"sec@{DOMAIN}", PASSWORD)
    await smtp.sendmail(f"sec@{DOMAIN}", [f"bob@{DOMAIN}"], message())
    await smtp.quit()


async def test_login_mechanism_with_smtplib(world: World) -> None:
    def run() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", world.port("submission"), timeout=10) as s:
            s.starttls(context=world.client_context())
            s.ehlo()
            s.user, s.password = f"sec@{DOMAIN}", PASSWORD
            assert s.auth("LOGIN", s.auth_login, initial_response_ok=False)[0] == 235
            return s.sendmail(f"sec@{DOMAIN}", [f"bob@{DOMAIN}"], message())

    assert await asyncio.to_thread(run) == {}


async def test_wrong_password_then_lockout(world: World) -> None:
    smtp = world.client()
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo()
    for _ in range(3):  # auth.max_failures = 3 in these tests
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            await smtp.auth_plain(f"sec@{DOMAIN}", "wrong password!!")
        assert (failed.value.code, failed.value.message[:5]) == (535, "5.7.8")
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as locked:
        await smtp.auth_plain(f"sec@{DOMAIN}", PASSWORD)  # right, but locked now
    assert (locked.value.code, locked.value.message[:5]) == (454, "4.7.0")
    await smtp.quit()


async def test_client_certificate_login_of_app_mailbox(world: World) -> None:
    smtp = world.client(cert=world.certs.app)
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo()
    assert (await cmd(smtp, f"MAIL FROM:<app@{DOMAIN}>"))[0] == 250
    assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
    code, text = await send_data(smtp, message(sender=f"app@{DOMAIN}"))
    assert code == 250, text
    assert world.gateway.store is not None
    assert world.gateway.store.get(queue_id_of(text))["auth_identity"] == f"app@{DOMAIN}"
    await smtp.quit()


async def test_sender_spoofing_refused(world: World) -> None:
    smtp = await world.submitter()
    code, text = await cmd(smtp, f"MAIL FROM:<bob@{DOMAIN}>")
    assert code == 550 and text.startswith("5.7.1") and "may not send as" in text
    assert (await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>"))[0] == 250
    assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
    code, text = await send_data(smtp, message(sender=f"Bob <bob@{DOMAIN}>"))
    assert code == 550 and text.startswith("5.7.1") and "From:" in text
    await smtp.quit()


async def test_malformed_paths_are_syntax_errors(world: World) -> None:
    smtp = await world.submitter()
    code, _ = await cmd(smtp, "MAIL FROM:<0@[>")  # trips the stdlib's RFC 5322 parser
    assert code == 553
    assert (await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>"))[0] == 250
    code, _ = await cmd(smtp, "RCPT TO:<0@[>")
    assert code == 553
    assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
    await smtp.quit()


RECIPIENT_CASES = [
    (f"bob@{DOMAIN}", 250, "2.1.5", "active local mailbox"),
    ("doc@b.mssante.test", 250, "2.1.5", "trusted operator"),
    ("someone@gmail.com", 550, "5.7.1", "consumer mailbox"),
    ("x@unknown-clinic.example", 550, "5.7.1", "not a mail domain of the health trust space"),
    (f"nobody@{DOMAIN}", 550, "5.1.1", "is not a mailbox"),
    (f"old@{DOMAIN}", 550, "5.1.1", "deactivated"),
]


async def test_recipient_rules_match_domains_check(world: World) -> None:
    smtp = await world.submitter()
    assert (await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>"))[0] == 250
    for address, code, enhanced, reason in RECIPIENT_CASES:
        got_code, text = await cmd(smtp, f"RCPT TO:<{address}>")
        assert (got_code, text[:5]) == (code, enhanced), (address, text)
        assert code == 250 or reason in text, (address, text)
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["--data-dir", str(world.home), "domains",
                                                                   "check", address])
        assert f"{code} {enhanced}" in result.output, result.output
    await smtp.quit()


async def test_partial_acceptance_queues_good_recipients_only(world: World) -> None:
    smtp = await world.submitter()
    await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>")
    assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
    assert (await cmd(smtp, "RCPT TO:<friend@gmail.com>"))[0] == 550
    assert (await cmd(smtp, "RCPT TO:<doc@b.mssante.test>"))[0] == 250
    code, text = await send_data(smtp, message())
    assert code == 250 and text.startswith("2.6.0")
    assert world.gateway.store is not None
    row = world.gateway.store.get(queue_id_of(text))
    assert sorted(r["address"] for r in row["recipient_states"]) == ["bob@a.mssante.test", "doc@b.mssante.test"]
    await smtp.quit()


async def test_limits_recipients_and_size(world: World) -> None:
    smtp = await world.submitter()
    await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>")
    for name in ("bob", "sec", "app"):
        assert (await cmd(smtp, f"RCPT TO:<{name}@{DOMAIN}>"))[0] == 250
    code, text = await cmd(smtp, f"RCPT TO:<old@{DOMAIN}>")
    assert (code, text[:5]) == (452, "4.5.3")
    await cmd(smtp, "RSET")
    assert await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}> SIZE=300000") == (552, "5.3.4 Message too big for system")
    await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>")
    await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>")
    code, text = await send_data(smtp, message(body="x" * 900 + "\r\n") * 250)
    assert (code, text[:5]) == (552, "5.3.4")
    code, text = await cmd(smtp, "NOOP " + "x" * 600)
    assert (code, text[:5]) == (500, "5.5.6")
    await smtp.quit()


UNCLOSED_MULTIPART = (
    f"From: sec@{DOMAIN}\r\nTo: bob@{DOMAIN}\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
).encode()

BAD_CONTENT = {
    "unclosed multipart": UNCLOSED_MULTIPART,
    "NUL byte": message(body="a\x00b\r\n"),
    "long line": message(body="y" * 999 + "\r\n"),
    "header injection": message(extra="Bcc bob@a.mssante.test\r\n"),
    "two From": message(extra=f"From: bob@{DOMAIN}\r\n"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENT))
async def test_malformed_content_refused_560(world: World, case: str) -> None:
    smtp = await world.submitter()
    await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>")
    await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>")
    code, text = await send_data(smtp, BAD_CONTENT[case])
    assert (code, text[:5]) == (550, "5.6.0"), text
    await smtp.quit()


async def test_plaintext_injected_after_starttls_is_dropped(world: World) -> None:
    """RFC 3207 5 (the 2011 STARTTLS command-injection bugs): a command pipelined in clear text
    after STARTTLS must not be run once TLS is up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port("submission"))

    async def reply() -> bytes:
        lines = [await reader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(await reader.readline())
        return b"".join(lines)

    assert (await reply()).startswith(b"220")
    writer.write(b"EHLO raw.test\r\n")
    assert (await reply()).startswith(b"250")
    writer.write(b"STARTTLS\r\nMAIL FROM:<sec@" + DOMAIN.encode() + b">\r\n")  # one segment
    assert (await reply()).startswith(b"220")
    await writer.start_tls(world.client_context(), server_hostname="localhost")
    writer.write(b"NOOP\r\n")
    first = await reply()
    assert first.startswith(b"250"), first  # the NOOP's answer: the injected MAIL was never read
    writer.write(b"QUIT\r\n")
    assert (await reply()).startswith(b"221")
    writer.close()


async def raw_transaction(world: World, data: bytes) -> bytes:
    """One transaction over implicit TLS, written byte for byte (client libraries fix line endings)."""
    from base64 import b64encode

    reader, writer = await asyncio.open_connection("127.0.0.1", world.port("submissions"),
                                                   ssl=world.client_context(), server_hostname="localhost")
    auth = b64encode(f"\0sec@{DOMAIN}\0{PASSWORD}".encode())
    writer.write(b"EHLO raw.test\r\nAUTH PLAIN " + auth + f"\r\nMAIL FROM:<sec@{DOMAIN}>\r\n".encode())
    writer.write(f"RCPT TO:<bob@{DOMAIN}>\r\nDATA\r\n".encode())
    writer.write(data + b"\r\n.\r\nQUIT\r\n")
    await writer.drain()
    replies = await reader.read()
    writer.close()
    return replies


async def test_bare_newlines_and_smuggling_refused(world: World) -> None:
    body = message(body="line one\nline two\r\n")
    replies = await raw_transaction(world, body)
    assert b"\r\n550 5.6.0 message contains a bare CR or LF" in replies
    smuggle = message(body="hi\r\n\n.\nMAIL FROM:<bob@a.mssante.test>\r\n")
    replies = await raw_transaction(world, smuggle)
    assert b"550 5.6.0" in replies and b"250 2.6.0" not in replies
    assert world.gateway.store is not None and world.gateway.store.list() == []


async def test_database_outage_answers_451_never_250(world: World) -> None:
    broken = sessionmaker(create_engine("sqlite:////nonexistent-dir/x.db"))
    handler = world.gateway.handlers[0]
    store = world.gateway.store
    assert store is not None
    smtp = await world.submitter()
    await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>")
    good = handler.deps.readers
    handler.deps.readers = broken
    try:
        code, text = await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>")
        assert (code, text[:5]) == (451, "4.3.5")
    finally:
        handler.deps.readers = good
    assert (await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>"))[0] == 250
    writes = store._factory
    store._factory = broken  # the queue database fails at commit time
    try:
        code, text = await send_data(smtp, message())
    finally:
        store._factory = writes
    assert (code, text[:5]) == (451, "4.3.0") and "Error" not in text
    assert store.list(include_done=True) == []
    assert not any(p.is_file() for p in store.spool_dir.rglob("*"))
    await smtp.quit()
    # The MAIL and RCPT records that were to ride with the message went back to the writer.
    assert world.gateway.audit is not None
    await world.gateway.audit.flush()
    with world.gateway.sessions() as db:  # type: ignore[misc]
        records = query(db, limit=100)
    assert [r["outcome"] for r in records if r["event"] in ("mail", "rcpt")] == ["accept", "accept"]
    assert not [r for r in records if r["event"] == "accept"]  # no message was accepted


async def test_mail_and_rcpt_records_commit_with_the_message(world: World) -> None:
    audit = world.gateway.audit
    assert audit is not None
    audit._linger = 3600.0  # the writer alone would not write them during this test
    smtp = await world.submitter()
    await smtp.sendmail(f"sec@{DOMAIN}", [f"bob@{DOMAIN}"], message())
    with world.gateway.sessions() as db:  # type: ignore[misc]
        records = {r["event"]: r for r in query(db, limit=100)}
    assert records["mail"]["outcome"] == "accept" and records["rcpt"]["outcome"] == "accept"
    assert records["mail"]["queue_id"] is None  # riders keep their own fields
    assert records["accept"]["queue_id"] is not None
    await smtp.quit()


async def test_unexpected_error_is_451_without_details(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    handler = world.gateway.handlers[0]

    async def explode(data: bytes) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(handler, "check_content", explode)
    smtp = await world.submitter()
    await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}>")
    await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>")
    code, text = await send_data(smtp, message())
    assert (code, text[:5]) == (451, "4.3.0") and "secret" not in text
    await smtp.quit()


async def test_missing_headers_added_and_8bit_kept(world: World) -> None:
    smtp = await world.submitter()
    raw = f"From: sec@{DOMAIN}\r\nTo: bob@{DOMAIN}\r\nSubject: é\r\n\r\nDonnées accentuées\r\n".encode()
    await cmd(smtp, f"MAIL FROM:<sec@{DOMAIN}> BODY=8BITMIME")
    await cmd(smtp, f"RCPT TO:<bob@{DOMAIN}>")
    code, text = await send_data(smtp, raw)
    assert code == 250, text
    assert world.gateway.store is not None
    stored = world.gateway.store.read(queue_id_of(text))
    assert stored.endswith(raw)  # the bytes received, untouched, after our trace fields
    parsed = message_from_bytes(stored)
    assert parsed["Message-ID"] and parsed["Date"] and parsed["Received"]
    await smtp.quit()


async def test_metrics_endpoint(world: World) -> None:
    smtp = await world.submitter()
    await smtp.sendmail(f"sec@{DOMAIN}", [f"bob@{DOMAIN}"], message())
    await smtp.quit()
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port("metrics"))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    assert body.startswith("HTTP/1.1 200 OK")
    assert 'mssgw_sessions_total{listener="submission"}' in body
    assert 'mssgw_messages_queued_total{origin="submission"} 1' in body
    assert 'mssgw_rcpt_total{decision="accept",listener="submission",rule="known-recipient"} 1' in body
    assert 'mssgw_auth_total{method="password",result="ok"} 1' in body


async def test_accept_path_on_each_database(world_any_db: World) -> None:
    world = world_any_db
    smtp = await world.submitter()
    errors, reply = await smtp.sendmail(f"sec@{DOMAIN}", [f"bob@{DOMAIN}", "doc@b.mssante.test"], message())
    assert errors == {} and reply.startswith("2.6.0")
    await smtp.quit()
    assert world.gateway.store is not None and world.gateway.audit is not None
    row = world.gateway.store.get(queue_id_of(reply))
    assert row["recipients"] == 2 and row["sha256"] == hashlib.sha256(world.gateway.store.read(row["id"])).hexdigest()
    await world.gateway.audit.flush()
    with world.gateway.sessions() as db:  # type: ignore[misc]
        from gateway.audit.trail import verify

        assert verify(db).ok
        assert {r["recipient"] for r in query(db, event="accept")} == {f"bob@{DOMAIN}", "doc@b.mssante.test"}
