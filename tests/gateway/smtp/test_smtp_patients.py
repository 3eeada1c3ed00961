"""Patients' mailboxes (<INS>@patient.mssante.fr) at the submission edge, with a real listener and client.

The patient messaging domain is trusted (routed to its operator, pinned operator identity),
as the MSSanté whitelist has it. Recognised: an INS with its key; refused: a bad key, an APP
sender, a message without the patient's INS in an IHE XDM package, another patient's INS, a
consumer domain. The INS never appears in logs or audit records: a salted pseudonym does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
from smtp_world import DOMAIN, PeerCerts, World, started

from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.audit.redact import pseudonym
from gateway.audit.trail import query
from gateway.config import load_settings
from tests.gateway.documents.xdm_samples import NIR, corsica_nir, message, package

pytestmark = pytest.mark.asyncio
SENDER = f"sec@{DOMAIN}"
PATIENT = f"{NIR}@patient.mssante.fr"


@pytest.fixture
async def world(gateway_home: Path, peer_certs: PeerCerts) -> AsyncIterator[World]:
    engine = make_engine(load_settings(gateway_home).database_url)
    with transaction(session_factory(engine)) as db:
        admin.trust_domain(db, "patient.mssante.fr", relay="127.0.0.1:1", operator_dn="CN=patient-operator")
    engine.dispose()
    async with started(gateway_home, peer_certs) as running:
        yield running


async def rcpt(smtp: aiosmtplib.SMTP, address: str) -> tuple[int, str]:
    response = await smtp.execute_command(b"RCPT", f"TO:<{address}>".encode())
    return response.code, response.message


async def send(world: World, data: bytes, to: str = PATIENT) -> tuple[int, str]:
    smtp = await world.submitter()
    try:
        response = await smtp.sendmail(SENDER, [to], data)
        code, text = 250, response[1]
    except aiosmtplib.SMTPDataError as exc:
        code, text = exc.code, exc.message
    except aiosmtplib.SMTPRecipientsRefused as exc:
        code, text = exc.recipients[0].code, exc.recipients[0].message
    await smtp.quit()
    return code, text


async def test_patient_address_recognised_and_bad_keys_refused(world: World) -> None:
    smtp = await world.submitter()
    await smtp.mail(SENDER)
    assert await rcpt(smtp, PATIENT) == (250, "2.1.5 Recipient OK")
    assert (await rcpt(smtp, f"{corsica_nir()}@patient.mssante.fr"))[0] == 250
    code, text = await rcpt(smtp, f"{NIR[:13]}88@patient.mssante.fr")
    assert code == 550 and text.startswith("5.1.1 not a patient's mailbox") and NIR[:13] not in text
    assert (await rcpt(smtp, "jeanne.dupont@patient.mssante.fr"))[0] == 550
    await smtp.quit()


async def test_app_mailboxes_may_not_write_to_patients(world: World) -> None:
    smtp = world.client(cert=world.certs.app)
    await smtp.connect()
    await smtp.starttls(server_hostname="localhost")
    await smtp.ehlo()
    assert (await smtp.execute_command(b"MAIL", f"FROM:<app@{DOMAIN}>".encode())).code == 250
    code, text = await rcpt(smtp, PATIENT)
    assert code == 550 and text.startswith("5.7.1 only a practitioner's (PER) or an organisation's (ORG)")
    assert (await rcpt(smtp, f"bob@{DOMAIN}"))[0] == 250
    await smtp.quit()


async def test_a_message_to_a_patient_carries_that_patients_ins(world: World,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    code, text = await send(world, message(None, sender=SENDER, to=PATIENT))
    assert code == 554 and "5.6.0 a message to a patient's mailbox carries the patient's INS" in text
    other = "1" + NIR[1:13]
    other += f"{97 - int(other) % 97:02d}"
    code, text = await send(world, message(package(), sender=SENDER, to=f"{other}@patient.mssante.fr"),
                            to=f"{other}@patient.mssante.fr")
    assert code == 554 and "not that of the patient's mailbox" in text
    code, text = await send(world, message(package(), sender=SENDER, to=PATIENT))
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[-1]
    assert world.gateway.store is not None
    row = world.gateway.store.get(queue_id)
    assert [r["address"] for r in row["recipient_states"]] == [PATIENT]  # the queue must know where to deliver
    assert world.gateway.audit is not None
    await world.gateway.audit.flush()
    with world.gateway.sessions() as db:  # type: ignore[misc]
        records = query(db, limit=300)
    assert any(r["recipient"] == f"{pseudonym(NIR)}@patient.mssante.fr" for r in records)
    for needle in (NIR, NIR[:13], other):
        assert all(needle not in str(r) for r in records)
        assert needle not in caplog.text


async def test_an_ins_never_goes_to_a_consumer_domain(world: World) -> None:
    code, text = await send(world, message(package(), sender=SENDER, to="jeanne@gmail.com"), to="jeanne@gmail.com")
    assert code == 550 and text.startswith("5.7.1 consumer mailbox")
