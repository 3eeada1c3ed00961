"""The outbound step honours the sender's DSN parameters (RFC 3461) kept in the queue.

The world of ``test_outbound`` (real operator home, real S/MIME, the relay's in-memory double);
the DSNs in the verdict are read by the strict RFC 3464 parser of
``tests/gateway/delivery/test_receipts_strict.py`` and by Python's email parser.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from test_outbound import CARDIO, LOCAL, MESSAGE, PHARMACY, RADIO, SENDER, World, dsn_fields, world

from directory.db import transaction
from gateway.process import pipeline
from gateway.process.verdict import Verdict
from gateway.queue.models import QueuedMessage
from tests.gateway.delivery.test_receipts_strict import parse_dsn

__all__ = ["world"]  # the fixture, shared with test_outbound


async def run(world: World, recipients: Sequence[str], *, notify: dict[str, str] | None = None,
              orcpt: dict[str, str] | None = None, envid: str | None = None, **columns: Any) -> Verdict:  # fmt: skip
    qid = world.store.enqueue(MESSAGE, sender=SENDER, recipients=list(recipients), origin="submission",
                              dsn_envid=envid, dsn_ret="HDRS" if envid else None, dsn_notify=notify,
                              dsn_orcpt=orcpt).queue_id  # fmt: skip
    if columns:
        with transaction(world.factory) as s:
            s.execute(update(QueuedMessage).where(QueuedMessage.id == qid).values(**columns))
    ((job, data),) = await world.workers._claim(1)
    return await pipeline.run(world.workers.ctx, job, data)


async def test_delay_dsn_only_for_recipients_that_ask_for_it(world: World) -> None:
    world.peer.replies.update({RADIO: (451, "4.4.1"), CARDIO: (451, "4.4.1"), PHARMACY: (451, "4.4.1")})
    old = dt.datetime.now(dt.UTC) - timedelta(hours=world.settings.queue.delay_warning_hours + 1)
    verdict = await run(world, [RADIO, CARDIO, PHARMACY], created_at=old, envid="batch 12",
                        notify={RADIO: "FAILURE", CARDIO: "DELAY"}, orcpt={CARDIO: "rfc822;cardiologie@b.mssante.test"})
    assert verdict.warned_at is not None
    (receipt,) = verdict.receipts
    _, per_message, rcpts = parse_dsn(receipt.data)
    assert per_message["original-envelope-id"] == "batch 12"
    # CARDIO asked for delays, PHARMACY gave no NOTIFY (failure and delay), RADIO asked failures only.
    assert sorted(r["final-recipient"].split(";")[1].strip() for r in rcpts) == sorted([CARDIO, PHARMACY])
    cardio = next(r for r in rcpts if r["final-recipient"].endswith(CARDIO))
    assert cardio["original-recipient"] == "rfc822; cardiologie@b.mssante.test" and cardio["action"] == "delayed"


async def test_never_silences_a_bounce_and_success_is_reported_only_when_asked(world: World) -> None:
    world.peer.replies[CARDIO] = (550, "5.1.1")
    verdict = await run(world, [CARDIO, PHARMACY, LOCAL], notify={CARDIO: "NEVER", LOCAL: "SUCCESS"})
    assert {o.address: o.state.value for o in verdict.outcomes} == {
        CARDIO: "bounced", PHARMACY: "delivered", LOCAL: "delivered"}
    (fields,) = dsn_fields(verdict)  # only the local delivery asked; the bounce asked for nothing
    assert fields["final-recipient"].endswith(LOCAL) and fields["action"] == "delivered"
    assert "original-recipient" not in fields
    (receipt,) = verdict.receipts
    _, per_message, _ = parse_dsn(receipt.data)
    assert "original-envelope-id" not in per_message  # no ENVID given: none invented


async def test_without_parameters_the_defaults_stay(world: World) -> None:
    world.peer.replies[CARDIO] = (550, "5.1.1")
    verdict = await run(world, [CARDIO, PHARMACY])
    (fields,) = dsn_fields(verdict)  # the failure, never the success
    assert fields["final-recipient"].endswith(CARDIO) and fields["action"] == "failed"
