"""Health documents at the submission edge: a real listener, a real client (aiosmtplib), real packages.

Packages are built by ``tests.gateway.documents.xdm_samples`` from the specification; the
decision is read from the SMTP reply, the queued bytes, the audit table and the logs, and no
INS may appear in the logs, the audit trail or the metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import aiosmtplib
import pytest
from smtp_world import DOMAIN, PeerCerts, World, started, write_settings

from gateway.audit.trail import query
from tests.gateway.documents.xdm_samples import NIR, cda, corsica_nir, message, package

pytestmark = pytest.mark.asyncio
SENDER = f"sec@{DOMAIN}"
TO = f"bob@{DOMAIN}"


async def submit(world: World, data: bytes) -> tuple[int, str]:
    smtp = await world.submitter()
    try:
        response = await smtp.sendmail(SENDER, [TO], data)
        code, text = 250, response[1]
    except aiosmtplib.SMTPDataError as exc:
        code, text = exc.code, exc.message
    await smtp.quit()
    return code, text


def stored_of(world: World, text: str) -> bytes:
    queue_id = text.rsplit(" ", 1)[-1]
    assert world.gateway.store is not None
    return world.gateway.store.read(queue_id)


async def audit_records(world: World) -> list[dict[str, object]]:
    assert world.gateway.audit is not None
    await world.gateway.audit.flush()
    with world.gateway.sessions() as db:  # type: ignore[misc]
        return query(db, limit=200)


async def test_consistent_package_is_queued_unchanged(world: World) -> None:
    data = message(package(), headers={"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "O"}, sender=SENDER, to=TO)
    code, text = await submit(world, data)
    assert code == 250, text
    assert stored_of(world, text).endswith(data)


async def test_missing_fields_are_added_from_the_package(world: World) -> None:
    code, text = await submit(world, message(package(), sender=SENDER, to=TO))
    assert code == 250, text
    stored = message_from_bytes(stored_of(world, text), policy=default)
    assert stored["X-MSS-CODECDA"] == "57833-6" and stored["X-MSS-INS"] == "O"


@pytest.mark.parametrize(("data", "reason"), [
    (message(package(), headers={"X-MSS-CODECDA": "11488-4", "X-MSS-INS": "O"}, sender=SENDER, to=TO),
     "X-MSS-CODECDA does not match"),
    (message(package(document=cda(traits=False)), headers={"X-MSS-INS": "O"}, sender=SENDER, to=TO),
     "X-MSS-INS must be N"),
    (message(package(bad_hash=True), sender=SENDER, to=TO), "hash in METADATA.XML differs"),
    (message(package(extra={"IHE_XDM/SUBSET01/BOMB.BIN": b"\0" * 3_000_000}), sender=SENDER, to=TO), "zip bomb"),
])
async def test_contradictions_and_bad_packages_refused_at_data(world: World, data: bytes, reason: str) -> None:
    code, text = await submit(world, data)
    assert code == 554 and text.startswith("5.6.0") and reason in text, text


async def test_wrong_ins_key_refused_and_never_logged_or_audited(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = NIR[:13] + "88"
    code, text = await submit(world, message(package(document=cda(nir=wrong), nir=wrong), sender=SENDER, to=TO))
    assert code == 554 and "5.6.0 Patient INS malformed" in text and wrong not in text
    # a good package is accepted too, so that its INS passes through every log line and record
    ok, _ = await submit(world, message(package(), sender=SENDER, to=TO))
    assert ok == 250
    records = await audit_records(world)
    refusal = [r for r in records if r["event"] == "data" and r["outcome"] == "refuse"]
    assert refusal and refusal[-1]["rule"] == "ins-malformed"
    for needle in (NIR, NIR[:13], "Patiente-Test", "Ordonnance de test"):
        assert needle not in caplog.text
        assert all(needle not in str(r) for r in records)
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port("metrics"))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    metrics = await reader.read()
    writer.close()
    assert b"mssgw_documents_checked_total" in metrics and NIR[:13].encode() not in metrics


@pytest.fixture
async def refusing_world(gateway_home: Path, peer_certs: PeerCerts) -> AsyncIterator[World]:
    write_settings(gateway_home, {"documents": {"missing_headers": "refuse"}})
    async with started(gateway_home, peer_certs) as running:
        yield running


async def test_missing_fields_refused_when_configured(refusing_world: World) -> None:
    code, text = await submit(refusing_world, message(package(), sender=SENDER, to=TO))
    assert code == 554 and "X-MSS-CODECDA and X-MSS-INS missing" in text, text


async def test_two_patients_a_lower_case_code_and_a_repeated_field_are_refused_and_counted(world: World) -> None:
    """Each refusal answers 554 5.6.0 at DATA and is counted by rule in mssgw_content_refused_total."""
    two = message_from_bytes(message(package(), sender=SENDER, to=TO), policy=default)
    other = corsica_nir()
    two.add_attachment(package(document=cda(nir=other), nir=other), maintype="application", subtype="zip",
                       filename="IHE_XDM.ZIP")  # fmt: skip
    code, text = await submit(world, two.as_bytes())
    assert code == 554 and text.startswith("5.6.0") and "2 different patients" in text, text
    assert NIR not in text and other not in text
    lower = message(package(), headers={"X-MSS-CODECDA": "57833-6", "X-MSS-INS": "o"}, sender=SENDER, to=TO)
    code, text = await submit(world, lower)
    assert code == 554 and "X-MSS-INS must be O" in text, text
    twice = message(package(), sender=SENDER, to=TO).replace(b"Subject:", b"X-MSS-INS: O\r\nX-MSS-INS: O\r\nSubject:", 1)
    code, text = await submit(world, twice)
    assert code == 554 and "may each appear once" in text, text
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port("metrics"))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    metrics = (await reader.read()).decode()
    writer.close()
    for rule in ("documents-several-patients", "x-mss-ins-mismatch", "x-mss-duplicate"):
        assert f'mssgw_content_refused_total{{rule="{rule}"}} 1.0' in metrics, rule
    assert "# HELP mssgw_documents_checked_total Messages whose health documents were checked" in metrics
