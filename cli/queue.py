"""``mssgw queue``: look at the durable queue and act on one message (never showing its body).

``list`` and ``show`` print envelopes and states (and whether the message's bytes are still
kept: they are removed once every recipient is final); ``retry`` makes waiting recipients
due now; ``delete`` removes a message for good with a reason (audited);
``quarantine`` lists, releases or deletes inbound messages that failed verification.
Errors (an unknown queue id, nothing to retry) are one line and exit status 2.
"""

from __future__ import annotations

from datetime import timedelta

import click

from cli.context import AppContext, pass_app
from cli.output import emit, emit_record
from gateway.queue.models import RecipientState
from gateway.queue.store import QueueError, QueueStore

COLUMNS = ("id", "created_at", "origin", "sender", "recipients", "size", "state", "bytes")  # bytes: kept|removed


def open_store(app: AppContext) -> QueueStore:
    q = app.settings.queue
    return QueueStore.for_database(app.sessions, app.settings.spool_dir, lifetime=timedelta(hours=q.lifetime_hours),
                                   lease=timedelta(seconds=q.lease_seconds))  # fmt: skip


@click.group("queue")
def queue() -> None:
    """The message queue: list, show, retry, delete, quarantine."""


@queue.command("list")
@click.option("--state", type=click.Choice([s.value for s in RecipientState]),
              help="Only messages with a recipient in this state.")
@click.option("--all", "include_done", is_flag=True, help="Include finished messages.")
@click.option("--limit", default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def list_(app: AppContext, state: str | None, include_done: bool, limit: int, as_json: bool) -> None:
    """Messages waiting in the queue (oldest first)."""
    emit(open_store(app).list(state=state, limit=limit, include_done=include_done), COLUMNS, as_json)


@queue.command("show")
@click.argument("queue_id")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def show(app: AppContext, queue_id: str, as_json: bool) -> None:
    """A message's envelope, recipients and their states (never its content)."""
    emit_record(open_store(app).get(queue_id), as_json)


@queue.command("retry")
@click.argument("queue_id")
@click.option("--force", is_flag=True,
              help="Take back the lease of a worker whose process is known to be dead (a node killed and "
                   "restarted), instead of waiting for it to run out. If that worker is alive, the peer may "
                   "get the message twice.")  # fmt: skip
@pass_app
def retry(app: AppContext, queue_id: str, force: bool) -> None:
    """Make the message's waiting recipients due now."""
    store = open_store(app)
    n = store.retry(queue_id, force=force)
    held = store.get(queue_id)
    if held.get("claimed_by") and held.get("lease_until"):  # an attempt is under way: its lease is kept
        click.echo(f"{queue_id}: {n} recipient(s) due when the attempt under way by {held['claimed_by']} ends "
                   f"(at the latest when its lease runs out, {held['lease_until']}; if that worker's process "
                   "is dead, `queue retry --force` takes the message back now)")
    else:
        click.echo(f"{queue_id}: {n} recipient(s) due now")


@queue.command("delete")
@click.argument("queue_id")
@click.option("--reason", required=True, help="Why (recorded in the audit trail).")
@pass_app
def delete(app: AppContext, queue_id: str, reason: str) -> None:
    """Delete a message for good; its undelivered recipients are marked deleted."""
    n = open_store(app).delete(queue_id, reason=reason)
    click.echo(f"{queue_id}: deleted ({n} undelivered recipient(s))")


@queue.group("quarantine")
def quarantine() -> None:
    """Inbound messages that failed verification, kept aside."""


@quarantine.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def quarantine_list(app: AppContext, as_json: bool) -> None:
    """Quarantined messages, with why each was held (our verdict's reply, never content)."""
    store = open_store(app)
    rows = []
    for row in store.quarantined():
        states = store.get(row["id"])["recipient_states"]
        held = [r for r in states if r["state"] == RecipientState.QUARANTINED.value]
        rows.append({**row, "reason": (held[0]["last_reply"] or "") if held else ""})
    emit(rows, (*COLUMNS, "reason"), as_json)


@quarantine.command("release")
@click.argument("queue_id")
@pass_app
def quarantine_release(app: AppContext, queue_id: str) -> None:
    """Deliver a quarantined message as it is (an admin vouches for it)."""
    n = open_store(app).release_quarantine(queue_id)
    click.echo(f"{queue_id}: released ({n} recipient(s)); delivered as is by the next worker round")


@quarantine.command("delete")
@click.argument("queue_id")
@click.option("--reason", required=True, help="Why (recorded in the audit trail).")
@pass_app
def quarantine_delete(app: AppContext, queue_id: str, reason: str) -> None:
    """Delete a quarantined message."""
    store = open_store(app)
    states = store.get(queue_id)["recipient_states"]
    if not any(r["state"] == RecipientState.QUARANTINED.value for r in states):
        raise QueueError(f"message {queue_id} is not in quarantine")
    n = store.delete(queue_id, reason=reason)
    click.echo(f"{queue_id}: deleted ({n} recipient(s))")


commands = queue
