"""``mssgw audit``: read, verify and purge the hash-chained audit trail.

``list`` filters by time (ISO 8601 or relative: ``30m``, ``2h``, ``7d``), address,
event and count; ``verify`` walks the chain and checks it against the signed seals
of ``audit/seals.jsonl``, exits 0 when both hold, 1 when broken (naming the first
sequence number that does not fit, or the seal broken and how, including a ``break``:
records the gateway wrote and later found deleted or changed); ``seal`` seals the
current head now (``mssgw serve`` seals periodically and at shutdown); ``purge``
applies ``audit.retention_days`` (``mssgw serve`` also runs it daily). Records hold
envelopes, identities and rules, never message content.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click

from cli.context import AppContext, pass_app
from cli.output import emit, emit_json
from gateway.audit.seal import Sealer, SealError, seals_path
from gateway.audit.sealcheck import check_home, seal_lines
from gateway.audit.trail import query, verify

COLUMNS = ("seq", "ts", "event", "outcome", "actor", "client", "sender", "recipient", "queue_id", "rule", "reply")
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``2h`` / ``7d`` (before now) or an ISO 8601 date or time (UTC when no offset is given)."""
    match = _RELATIVE.match(text.strip().lower())
    if match:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give an ISO date/time or a duration like 30m, 2h, 7d") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@click.group("audit")
def audit() -> None:
    """The audit trail: every decision, hash-chained."""


@audit.command("list")
@click.option("--since", help="ISO date/time, or a duration before now (30m, 2h, 7d).")
@click.option("--address", help="Records where this address is sender, recipient or actor.")
@click.option("--event", help="connect, auth, mail, rcpt, data, accept, deliver, ...")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def list_(app: AppContext, since: str | None, address: str | None, event: str | None, limit: int,
          as_json: bool) -> None:
    """The latest records matching the filters, oldest first."""
    when = parse_since(since) if since else None
    with app.transaction() as session:
        rows = query(session, since=when, address=address, event=event, limit=limit)
    emit(rows, COLUMNS, as_json)


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def verify_(app: AppContext, as_json: bool) -> None:
    """Check the hash chain and the seals; exit 0 when both hold, 1 when broken (the seq or seal is named)."""
    # The seal lines first, then one snapshot of the records (never the write lock: the
    # gateway keeps writing while a long trail is checked).
    lines = seal_lines(seals_path(app.settings.home))
    with app.read() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        result = verify(session)
        seals = check_home(session, app.settings, lines=lines)
    if as_json:
        emit_json({"ok": result.ok and seals.ok, "records": result.records, "first_seq": result.first_seq,
                   "last_seq": result.last_seq, "broken_at": result.broken_at, "problem": result.problem,
                   "seals": seals.as_dict()})  # fmt: skip
    else:
        click.echo(result.summary())
        for line in seals.lines():
            click.echo(line)
    raise click.exceptions.Exit(0 if result.ok and seals.ok else 1)


@audit.command("seal")
@pass_app
def seal_(app: AppContext) -> None:
    """Seal the trail's current head now (signed with the operator key, appended to audit/seals.jsonl)."""
    try:
        made = Sealer.for_settings(app.settings, app.sessions).seal()
    except SealError as exc:
        raise click.ClickException(str(exc)) from None
    if made is None:
        click.echo("nothing new to seal")
    else:
        click.echo(f"sealed seq {made['head_seq']} ({made['count']} records, head {made['head_hash'][:16]}...)")


@audit.command("purge")
@pass_app
def purge_(app: AppContext) -> None:
    """Remove records older than audit.retention_days (the chain stays verifiable)."""
    from gateway.app import purge_audit

    removed = purge_audit(app.sessions, app.settings)
    click.echo(f"{removed} record(s) older than {app.settings.audit.retention_days} days removed")


commands = audit
