"""MSSanté mode between two mssgw: signed mail over pinned mutual TLS, accepted per peer policy.

Two real operators on loopback (``conftest.pair``).  B knows no certificate for A's mailbox
``accueil@a``, so B signs the message and relays it over mutual TLS pinned to A's operator DN
(``mtls-signed``).  A accepts it only when its trust list says B need not encrypt end to end
(``mssgw domains trust --no-require-encryption``, run as an admin would); otherwise A
quarantines it as "not encrypted", as before.  The Authentication-Results header is read by
the ``authres`` package (an independent RFC 8601 parser).
"""

from __future__ import annotations

import json
from pathlib import Path

import authres  # type: ignore[import-untyped]
import authres.smime  # type: ignore[import-untyped]
from click.testing import CliRunner
from e2e_support import A_DOMAIN, B_DOMAIN, PDF, PRACTITIONER, SUBJECT, Pair, parse, prescription

from cli.main import cli
from directory import admin
from directory.db import transaction
from gateway.delivery.relay import Route

BACKENDS = ("sqlite", "postgresql")  # each operator on each store (conftest.pytest_generate_tests)
DESK = f"accueil@{A_DOMAIN}"  # a mailbox of A that B has no certificate for


def _mssgw(home: Path, *args: str) -> str:
    out = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    assert out.exit_code == 0, out.output
    return out.output


def _add_desk(pair: Pair) -> None:
    with transaction(pair.a.sessions) as s:
        admin.add_mailbox(s, DESK, type="ORG", display_name="Accueil")


def _relax(pair: Pair) -> None:
    """A's admin: B's mail may come signed over pinned mutual TLS, not encrypted end to end."""
    _mssgw(pair.a.home, "domains", "trust", B_DOMAIN, "--no-require-encryption")


def _auth_results(msg: object) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    ar = " ".join(str(msg["Authentication-Results"]).split())  # type: ignore[index]
    header = authres.core.AuthenticationResultsHeader(authres.FeatureContext(authres.smime), strict=True)
    header._parse_text = ar
    header._parse()
    assert header.authserv_id == f"mx.{A_DOMAIN}", ar
    return [(r.method, r.result, [(p.type, p.name, p.value) for p in r.properties]) for r in header.results]


def _protections(op: object, origin: str) -> list[tuple[str, str, str]]:
    rows = [m for m in op.store.list(include_done=True) if m["origin"] == origin]  # type: ignore[attr-defined]
    out = []
    for m in rows:
        for r in op.queue(m["id"])["recipient_states"]:  # type: ignore[attr-defined]
            out.append((r["address"], r["state"], r["protection"]))
    return out


async def test_signed_over_pinned_mtls_is_delivered_when_the_peer_need_not_encrypt(pair: Pair) -> None:
    a, b = pair.a, pair.b
    _add_desk(pair)
    _relax(pair)
    listed = {d["domain"]: d for d in json.loads(_mssgw(a.home, "domains", "list", "--json"))}
    assert listed[B_DOMAIN]["require_encryption"] is False
    assert json.loads(_mssgw(a.home, "peers", "show", B_DOMAIN, "--json"))["require_encryption"] is False
    assert listed[A_DOMAIN]["require_encryption"] is None  # our own domain: not a peer's policy

    b.enqueue(prescription(sender=PRACTITIONER, to=DESK), PRACTITIONER, [DESK])
    await pair.flow()

    assert [(addr, prot) for addr, _, prot in _protections(b, "submission")] == [(DESK, "mtls-signed")]
    assert a.store.quarantined() == []
    assert _protections(a, "inbound") == [(DESK, "delivered", "mtls-signed")]
    (delivered,) = a.mailbox(DESK)
    msg = parse(delivered)
    assert msg.get_content_type() == "multipart/mixed"  # the original, not a signed wrapper
    assert msg["Subject"] == SUBJECT and msg["From"].addresses[0].addr_spec == PRACTITIONER
    results = _auth_results(msg)
    assert [(m, r) for m, r, _ in results] == [("smime", "pass"), ("x-peer-tls", "pass")]
    assert ("body", "smime-identifier", PRACTITIONER) in results[0][2]
    assert results[1][2] == [("policy", "peer-operator", B_DOMAIN)]
    assert "signed, not encrypted end to end" in " ".join(str(msg["Authentication-Results"]).split())
    texts = [p.get_content() for p in msg.walk() if p.get_content_type() == "text/plain"]  # type: ignore[attr-defined]
    assert texts[0].startswith("[Signé par ") and "TLS authentifié" in texts[0]  # the banner (fr): no encryption claimed
    assert "chiffré" not in texts[0]
    pdf = next(p for p in msg.iter_attachments() if p.get_content_type() == "application/pdf")
    assert pdf.get_content() == PDF  # type: ignore[attr-defined]
    # B's sender asked for an MDN: A's "processed" reaches it (A has its certificate: encrypted)
    mdns = [m for m in b.mailbox(PRACTITIONER) if b"disposition-notification" in m]
    assert len(mdns) == 1 and b"processed" in mdns[0]


async def test_the_peer_notice_back_is_accepted_the_same_way(pair: Pair) -> None:
    """A's mailbox writes to B with an MDN request; B's MDN back goes signed only (B has no
    certificate for A's mailbox) and A delivers it instead of quarantining it."""
    a, b = pair.a, pair.b
    _add_desk(pair)
    _relax(pair)
    original_id = f"<desk-asks@{A_DOMAIN}>"
    a.enqueue(prescription(sender=DESK, to=PRACTITIONER, message_id=original_id), DESK, [PRACTITIONER])
    await pair.flow()

    assert len(b.mailbox(PRACTITIONER)) == 1
    assert [(addr, prot) for addr, _, prot in _protections(b, "receipt")] == [(DESK, "mtls-signed")]
    assert a.store.quarantined() == []
    (notice,) = a.mailbox(DESK)
    msg = parse(notice)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    assert original_id.encode() in notice and b"processed" in notice
    results = _auth_results(msg)
    assert [(m, r) for m, r, _ in results] == [("smime", "pass"), ("x-peer-tls", "pass")]


async def test_the_same_message_is_quarantined_when_the_peer_must_encrypt(pair: Pair) -> None:
    a, b = pair.a, pair.b
    _add_desk(pair)
    _mssgw(a.home, "domains", "trust", B_DOMAIN, "--require-encryption")
    shown = _mssgw(a.home, "peers", "list")
    header, row = shown.splitlines()[:2]
    assert "REQUIRE_ENCRYPTION" in header and row.startswith(B_DOMAIN) and " True " in row

    b.enqueue(prescription(sender=PRACTITIONER, to=DESK, mdn=False), PRACTITIONER, [DESK])
    await pair.flow()

    assert [(addr, prot) for addr, _, prot in _protections(b, "submission")] == [(DESK, "mtls-signed")]
    held = a.store.quarantined()
    assert len(held) == 1
    states = [(addr, state) for addr, state, _ in _protections(a, "inbound")]
    assert states == [(DESK, "quarantined")]
    reply = a.queue(held[0]["id"])["recipient_states"][0]["last_reply"]
    assert "not-encrypted" in reply
    box = a.mailbox(DESK)  # only the notice without content
    assert len(box) == 1 and SUBJECT.encode() not in box[0]


async def test_a_peer_that_need_not_encrypt_still_cannot_send_unsigned_mail(pair: Pair) -> None:
    """The relaxed policy drops the encryption requirement only: a clear message is still held."""
    a, b = pair.a, pair.b
    _add_desk(pair)
    _relax(pair)
    route = Route(A_DOMAIN, "127.0.0.1", a.inbound_port, a.operator_dn)
    attempts = await b.workers.ctx.relay.send(route, PRACTITIONER, [DESK],  # type: ignore[attr-defined]
                                              prescription(sender=PRACTITIONER, to=DESK, mdn=False))
    assert attempts[0].ok, attempts
    await a.workers.run_once()  # type: ignore[attr-defined]
    held = a.store.quarantined()
    assert len(held) == 1
    assert "not-signed" in a.queue(held[0]["id"])["recipient_states"][0]["last_reply"]
