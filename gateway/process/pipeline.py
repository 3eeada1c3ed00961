"""One run of the pipeline for one claimed message: the step its origin calls for, returning a ``Verdict``.

The queue's workers call ``run`` and commit what it returns; nothing here touches the queue.
Inbound messages (origin ``inbound``: from a peer operator) are opened and verified
(``gateway.process.inbound``); everything else (submissions, receipts) is protected and sent
(``gateway.process.outbound``).

Errors: none escape.  An unexpected error is logged with its traceback (never with content) and
the recipients it left undecided are deferred (``Verdict.defer_rest``): retried, never dropped.
"""

from __future__ import annotations

import logging

from gateway.core.errors import MssgwError
from gateway.process.common import Context
from gateway.process.verdict import Job, Verdict

__all__ = ["run"]

log = logging.getLogger("mssgw.process")


async def run(ctx: Context, job: Job, data: bytes) -> Verdict:
    """Process ``job`` (whose bytes are ``data``) and return the run's verdict."""
    verdict = ctx.begin(job)
    try:
        if job.origin == "inbound":
            from gateway.process.inbound import process_inbound

            await process_inbound(ctx, job, data)
        else:
            from gateway.process.outbound import process_outbound

            await process_outbound(ctx, job, data)
    except MssgwError as exc:  # a known condition (a key that does not open, an outage): its sentence, no traceback
        log.error("processing %s deferred: %s: %s", job.id, type(exc).__name__, exc)
        verdict.defer_rest(job, exc, actor=ctx.actor)
    except Exception as exc:
        log.exception("processing %s failed", job.id)
        verdict.defer_rest(job, exc, actor=ctx.actor)
    finally:
        ctx.end(job)
    return verdict
