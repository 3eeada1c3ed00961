"""The DSN extension (RFC 3461) on the submission listeners, from real clients to the DSN the sender gets.

smtplib and aiosmtplib speak to a running gateway over TLS on loopback; the parameters are read
back from the queue's rows, then the queued message is run through the outbound pipeline (the
relay boundary is the in-memory double of ``tests/gateway/process/test_outbound.py``) and the
DSN is read by Python's email parser and by the strict RFC 3464 parser of
``tests/gateway/delivery/test_receipts_strict.py``.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import Message

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st
from smtp_world import DOMAIN, PASSWORD, World, message
from sqlalchemy import select

from gateway.delivery.relay import Attempt, DsnRequest, Route
from gateway.process import pipeline
from gateway.process.verdict import Verdict
from gateway.queue.models import QueuedMessage, QueuedRecipient
from gateway.queue.worker import Workers
from gateway.smtp.dsn import MAIL_PARAMS, DsnSyntaxError, parse_mail, parse_rcpt, take_params
from tests.gateway.delivery.test_receipts_strict import parse_dsn

SENDER = f"sec@{DOMAIN}"
LOCAL = f"bob@{DOMAIN}"
REMOTE = "doc@b.mssante.test"


async def cmd(smtp: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    verb, _, arg = line.partition(" ")
    response = await smtp.execute_command(verb.encode(), *([arg.encode()] if arg else []))
    return response.code, response.message


def submit(world: World, recipients: Sequence[str], *, mail_options: Sequence[str] = (),
           rcpt_options: Sequence[str] = ()) -> str:  # fmt: skip
    """smtplib's sendmail with ESMTP parameters (smtplib sends them only when EHLO offered DSN)."""
    with smtplib.SMTP("127.0.0.1", world.port("submission"), timeout=10) as s:
        s.starttls(context=world.client_context())
        s.ehlo()
        assert s.has_extn("dsn")
        s.login(SENDER, PASSWORD)
        s.mail(SENDER, list(mail_options))
        for rcpt in recipients:
            code, text = s.rcpt(rcpt, list(rcpt_options))
            assert code == 250, text
        code, text = s.data(message(SENDER, ", ".join(recipients)))
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def rows(world: World, queue_id: str) -> tuple[QueuedMessage, list[QueuedRecipient]]:
    assert world.gateway.sessions is not None
    with world.gateway.sessions() as db:
        msg = db.get(QueuedMessage, queue_id)
        assert msg is not None
        rcpts = list(db.scalars(select(QueuedRecipient).where(QueuedRecipient.message_id == queue_id)
                                .order_by(QueuedRecipient.id)))  # fmt: skip
        db.expunge_all()
        return msg, rcpts


@dataclass
class Peer:
    """The relay boundary's in-memory double: one reply per recipient (default 250)."""

    replies: dict[str, tuple[int, str]] = field(default_factory=dict)

    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:
        out = []
        for r in recipients:
            code, status = self.replies.get(r, (250, "2.0.0"))
            out.append(Attempt(r, code, status, f"{code} {status} scripted", "mx.b.test:25"))
        return out


async def run_once(world: World, peer: Peer) -> Verdict:
    """Claim the queued message and run the outbound step once (no commit: the verdict is read)."""
    assert world.gateway.sessions is not None and world.gateway.store is not None
    workers = Workers(world.settings, world.gateway.sessions, world.gateway.store, relay=peer,
                      crypto_executor="inline")  # fmt: skip
    ((job, data),) = await workers._claim(1)
    return await pipeline.run(workers.ctx, job, data)


def delivery_status(dsn: bytes) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Per-message and per-recipient fields, read by Python's email parser."""
    report = email.message_from_bytes(dsn)
    assert report.get_content_type() == "multipart/report"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list) and all(isinstance(b, Message) for b in blocks)
    per_message, *per_rcpt = ({k.lower(): v for k, v in b.items()} for b in blocks)
    return per_message, per_rcpt


async def test_dsn_offered_on_submission_and_to_peers(world: World) -> None:
    """Submission takes the sender's request; the inbound listener takes it from a peer operator
    that passes it on (RFC 3461 §6.2)."""
    smtp = world.client()
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    _, text = await cmd(smtp, "EHLO client.test")
    assert "\nDSN\n" in f"\n{text}\n" and "ENHANCEDSTATUSCODES" in text
    await smtp.quit()
    inbound = world.client("inbound")
    await inbound.connect()
    _, text = await cmd(inbound, "EHLO peer.test")
    assert "DSN" in text.split("\n")
    await inbound.quit()


async def test_parameters_are_queued_with_the_message_and_each_recipient(world_any_db: World) -> None:
    """On SQLite and PostgreSQL: the columns of migration 0008 hold what the client sent."""
    world = world_any_db
    queue_id = await asyncio.to_thread(
        submit, world, [LOCAL, REMOTE], mail_options=["ENVID=Ref+2B42+3Dxyz", "RET=HDRS"],
        rcpt_options=["NOTIFY=FAILURE,SUCCESS", f"ORCPT=rfc822;Alias+2Bdoc@{DOMAIN}"],
    )  # fmt: skip
    msg, rcpts = rows(world, queue_id)
    assert (msg.dsn_envid, msg.dsn_ret) == ("Ref+42=xyz", "HDRS")  # xtext decoded, case kept
    assert [(r.address, r.dsn_notify, r.dsn_orcpt) for r in rcpts] == [
        (LOCAL, "SUCCESS,FAILURE", f"rfc822;Alias+doc@{DOMAIN}"),
        (REMOTE, "SUCCESS,FAILURE", f"rfc822;Alias+doc@{DOMAIN}"),
    ]


async def test_without_parameters_nothing_is_stored(world: World) -> None:
    queue_id = await asyncio.to_thread(submit, world, [LOCAL])
    msg, (rcpt,) = rows(world, queue_id)
    assert (msg.dsn_envid, msg.dsn_ret, rcpt.dsn_notify, rcpt.dsn_orcpt) == (None, None, None, None)


@pytest.mark.parametrize(("line", "reason"), [
    (f"MAIL FROM:<{SENDER}> ENVID=a=b", "ENVID is not xtext"),
    (f"MAIL FROM:<{SENDER}> ENVID=a+0Ab", "printable US-ASCII"),
    (f"MAIL FROM:<{SENDER}> ENVID={'x' * 101}", "ENVID must have 1 to 100 characters"),
    (f"MAIL FROM:<{SENDER}> ENVID=", "ENVID must have 1 to 100 characters"),
    (f"MAIL FROM:<{SENDER}> RET=BODY", "RET must be FULL or HDRS"),
    (f"MAIL FROM:<{SENDER}> RET=FULL RET=HDRS", "RET given twice"),
])  # fmt: skip
async def test_bad_mail_parameters_are_refused_with_the_reason(world: World, line: str, reason: str) -> None:
    smtp = await world.submitter()
    code, text = await cmd(smtp, line)
    assert code == 501 and text.startswith("5.5.4") and reason in text, (code, text)
    assert await cmd(smtp, f"MAIL FROM:<{SENDER}> ENVID=ok RET=full") == (250, "2.1.0 Sender OK")
    await smtp.quit()


@pytest.mark.parametrize(("option", "expected", "reason"), [
    ("NOTIFY=NEVER,SUCCESS", 501, "NOTIFY must be NEVER or a list"),
    ("NOTIFY=SOMETIMES", 501, "NOTIFY must be NEVER or a list"),
    ("NOTIFY=DELAY,DELAY", 501, "NOTIFY must be NEVER or a list"),
    (f"ORCPT={LOCAL}", 501, "ORCPT must be addr-type;xtext"),
    ("ORCPT=rfc822;", 501, "ORCPT must be addr-type;xtext"),
    ("ORCPT=rfc822;a b", 555, "not recognised"),  # "b" is no parameter we know
    ("ORCPT=rfc822;caf\u00e9@a.test", 553, ""),  # non-ASCII without SMTPUTF8: refused before any parsing
    ("NOTIFY=FAILURE NOTIFY=DELAY", 501, "NOTIFY given twice"),
])  # fmt: skip
async def test_bad_rcpt_parameters_are_refused_with_the_reason(world: World, option: str, expected: int,
                                                              reason: str) -> None:  # fmt: skip
    smtp = await world.submitter()
    assert (await cmd(smtp, f"MAIL FROM:<{SENDER}>"))[0] == 250
    code, text = await cmd(smtp, f"RCPT TO:<{LOCAL}> {option}")
    assert code == expected and text.startswith("5.") and reason.lower() in text.lower(), (code, text)
    # The transaction goes on: the same recipient with good parameters is accepted.
    code, _ = await cmd(smtp, f"RCPT TO:<{LOCAL}> NOTIFY=never ORCPT=RFC822;{LOCAL}")
    assert code == 250
    await smtp.quit()


async def test_the_longest_legal_parameters_fit_on_their_command_lines(world: World) -> None:
    """RFC 3461 §5: MAIL gets 100 more characters, RCPT 500, where DSN is offered: an ENVID of 100
    characters and an ORCPT of 500 are accepted, one character more is refused for its length."""
    smtp = await world.submitter()
    envid = "E" * 100
    assert (await cmd(smtp, f"MAIL FROM:<{SENDER}> RET=HDRS ENVID={envid}"))[0] == 250
    orcpt_address = "o" * (500 - len("rfc822;") - len("@a.mssante.test")) + "@a.mssante.test"
    orcpt = f"rfc822;{orcpt_address}"
    assert len(orcpt) == 500
    code, text = await cmd(smtp, f"RCPT TO:<{LOCAL}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}")
    assert code == 250, (code, text)
    code, text = await cmd(smtp, f"RCPT TO:<{LOCAL}> ORCPT={orcpt}o")
    assert code == 501 and "at most 500" in text, (code, text)
    await smtp.quit()


async def test_dsn_parameters_before_mail_keep_the_order_of_checks(world: World) -> None:
    """aiosmtpd's own checks come first: a bad ENVID before login is still "authentication required"."""
    smtp = world.client()
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await cmd(smtp, "EHLO client.test")
    code, text = await cmd(smtp, f"MAIL FROM:<{SENDER}> ENVID=a=b")
    assert code == 530, text
    await smtp.quit()


async def test_success_dsns_carry_envid_and_orcpt_headers_only(world_any_db: World) -> None:
    world = world_any_db
    queue_id = await asyncio.to_thread(
        submit, world, [LOCAL, REMOTE], mail_options=["ENVID=lot+2D7", "RET=HDRS"],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{LOCAL}"],
    )  # fmt: skip
    verdict = await run_once(world, Peer())
    assert {o.address: o.state.value for o in verdict.outcomes} == {LOCAL: "delivered", REMOTE: "delivered"}
    assert len(verdict.receipts) == 2 and {r.to for r in verdict.receipts} == {SENDER}
    seen: dict[str, dict[str, str]] = {}
    for receipt in verdict.receipts:
        assert receipt.kind == "dsn" and receipt.sender == "" and receipt.related_id == queue_id
        _, strict_message, strict_rcpts = parse_dsn(receipt.data)  # the strict grammar accepts it
        per_message, (fields,) = delivery_status(receipt.data)
        assert per_message["original-envelope-id"] == strict_message["original-envelope-id"] == "lot-7"
        assert fields["original-recipient"] == strict_rcpts[0]["original-recipient"] == f"rfc822; {LOCAL}"
        assert fields["status"] == "2.0.0"
        seen[fields["final-recipient"].split(";")[1].strip()] = fields
        assert b"Bonjour" not in receipt.data  # RET=HDRS: the headers only
        assert b"Subject: Successful Mail Delivery Report" in receipt.data
    assert seen[LOCAL]["action"] == "delivered" and "remote-mta" not in seen[LOCAL]
    assert seen[REMOTE]["action"] == "relayed" and seen[REMOTE]["remote-mta"] == "dns; mx.b.test"


async def test_notify_never_gets_no_dsn_and_failure_only_no_success(world: World) -> None:
    await asyncio.to_thread(submit, world, [REMOTE], rcpt_options=["NOTIFY=NEVER"])
    verdict = await run_once(world, Peer({REMOTE: (550, "5.1.1")}))
    assert [o.state.value for o in verdict.outcomes] == ["bounced"] and verdict.receipts == []
    # FAILURE only: a delivery says nothing; a refusal gets its DSN (ENVID absent: no Original-Envelope-Id).
    await asyncio.to_thread(submit, world, [LOCAL], rcpt_options=["NOTIFY=FAILURE"])
    verdict = await run_once(world, Peer())
    assert [o.state.value for o in verdict.outcomes] == ["delivered"] and verdict.receipts == []
    await asyncio.to_thread(submit, world, [REMOTE], rcpt_options=["NOTIFY=FAILURE"])
    verdict = await run_once(world, Peer({REMOTE: (550, "5.1.1")}))
    (receipt,) = verdict.receipts
    _, per_message, (fields,) = parse_dsn(receipt.data)
    assert "original-envelope-id" not in per_message and "original-recipient" not in fields
    assert (fields["action"], fields["status"]) == ("failed", "5.1.1")


# --- the parameter parser against arbitrary input (ARCHITECTURE rule 9) ------------------------------


def xtext(text: str) -> str:
    """RFC 3461 §4 encoding, written here from the grammar (not taken from gateway.smtp.dsn)."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=60))
def test_xtext_round_trip(text: str) -> None:
    assert parse_mail({"ENVID": xtext(text)}).envid == text
    assert parse_rcpt({"ORCPT": "rfc822;" + xtext(text)}).orcpt == "rfc822;" + text


@given(st.dictionaries(st.sampled_from(["ENVID", "RET", "NOTIFY", "ORCPT"]), st.one_of(st.none(), st.text(max_size=600))))
def test_any_parameter_value_is_parsed_or_refused_with_a_reason(params: dict[str, str | None]) -> None:
    mail = {k: v for k, v in params.items() if k in ("ENVID", "RET")}
    rcpt = {k: v for k, v in params.items() if k in ("NOTIFY", "ORCPT")}
    for parse, taken in ((parse_mail, mail), (parse_rcpt, rcpt)):
        try:
            found = parse(taken)  # type: ignore[operator]
        except DsnSyntaxError as exc:
            assert str(exc)
            continue
        for value in vars(found).values():  # what reaches a DSN's header: printable ASCII, bounded
            assert value is None or (value.isascii() and value.isprintable() and len(value) <= 500)


@given(st.text(max_size=300))
def test_take_params_never_fails_and_keeps_other_parameters(tail: str) -> None:
    def getaddr(arg: str) -> tuple[str | None, str | None]:
        return ("a@b.test", arg[len("<a@b.test>"):].lstrip()) if arg.startswith("<a@b.test>") else (None, None)

    arg, taken = take_params(f"FROM:<a@b.test> {tail}", "FROM:", MAIL_PARAMS, getaddr)
    kept = arg.split()[1:]
    assert not any(t.partition("=")[0].upper() in MAIL_PARAMS for t in kept)
    assert set(taken) <= MAIL_PARAMS
