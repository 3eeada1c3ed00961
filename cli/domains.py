"""``mssgw domains``: the trust list, blocked domains, and what the gateway would decide."""

from __future__ import annotations

from pathlib import Path

import click

from cli.context import AppContext, pass_app
from cli.output import emit, emit_json
from directory import admin, facts
from gateway.policy.recipients import decide_recipient


@click.group("domains")
def domains() -> None:
    """Trusted operator domains, blocked domains, and recipient checks."""


@domains.command("trust")
@click.argument("domain")
@click.option("--relay", help="HOST:PORT of the operator's inbound gateway.")
@click.option("--mx", "use_mx", is_flag=True, help="Route by the domain's MX records instead of --relay.")
@click.option("--operator-dn", help="The operator's certificate identity, as in the MSSanté whitelist.")
@click.option("--openpgp/--no-openpgp", "prefers_openpgp", default=None,
              help="The operator prefers OpenPGP when recipients publish keys.")
@click.option("--require-encryption/--no-require-encryption", "require_encryption", default=None,
              help="Whether its mail must be encrypted end to end (default for a new domain: yes); "
                   "--no-require-encryption accepts it signed over mutual TLS pinned to --operator-dn.")
@pass_app
def trust(app: AppContext, domain: str, relay: str | None, use_mx: bool, operator_dn: str | None,
          prefers_openpgp: bool | None, require_encryption: bool | None) -> None:
    """Add a peer operator's domain to the trust list (or update it)."""
    with app.transaction() as session:
        row = admin.trust_domain(session, domain, relay=relay, operator_dn=operator_dn, use_mx=use_mx,
                                 prefers_openpgp=prefers_openpgp, require_encryption=require_encryption)
        if row.relay is None and not row.use_mx:
            click.echo(f"note: {row.name} has no --relay HOST:PORT: mail to it goes to its MX records", err=True)
        if require_encryption is False and not row.operator_dn:
            click.echo(f"note: {row.name} has no --operator-dn: its mail must still be encrypted end to end "
                       "until its identity is pinned", err=True)
    click.echo(f"{row.name} trusted")


@domains.command("block")
@click.argument("domain")
@click.option("--reason", required=True, help="Why: shown to senders in the refusal.")
@pass_app
def block(app: AppContext, domain: str, reason: str) -> None:
    """Block a domain (a pattern like 'example.*' is allowed)."""
    with app.transaction() as session:
        row = admin.block_domain(session, domain, reason=reason)
    click.echo(f"{row.name} blocked")


@domains.command("remove")
@click.argument("domain")
@pass_app
def remove(app: AppContext, domain: str) -> None:
    """Remove a trusted or blocked domain."""
    with app.transaction() as session:
        admin.remove_domain(session, domain)
    click.echo(f"{domain.lower()} removed")


@domains.command("list")
@click.option("--kind", type=click.Choice(["local", "trusted", "blocked"]))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def list_(app: AppContext, kind: str | None, as_json: bool) -> None:
    """List our domains, trusted operators and blocked domains."""
    with app.read() as session:
        rows = admin.list_domains(session, kind)
    emit(rows, ("domain", "kind", "relay", "operator_dn", "require_encryption", "reason"), as_json)


@domains.command("import-whitelist")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def import_whitelist(app: AppContext, file: Path, as_json: bool) -> None:
    """Load the MSSanté whitelist XML: every listed domain becomes trusted with its operator's identity."""
    load_whitelist(app, file, as_json)


def load_whitelist(app: AppContext, file: Path, as_json: bool) -> None:
    """The import and its report, for 'domains import-whitelist' and 'peers import-whitelist'."""
    from directory.importers import import_whitelist as run_import

    report = run_import(app.sessions, file, local_domains=app.settings.domains)
    if as_json:
        emit_json(report.as_dict())
        return
    click.echo(report.summary())
    for line_no, reason in report.skipped:
        click.echo(f"  line {line_no}: {reason}", err=True)


@domains.command("check")
@click.argument("address")
@click.option("--inbound", is_flag=True, help="Decide as for a message from a peer operator.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def check(app: AppContext, address: str, inbound: bool, as_json: bool) -> None:
    """Print the decision the SMTP edge takes for this recipient; exit 0 to accept, 1 to refuse."""
    with app.read() as session:
        found = facts.recipient_facts(session, address)
    decision = decide_recipient(found, inbound=inbound)
    if as_json:
        emit_json({"address": found.address, **decision.as_dict()})
    else:
        verdict = "ACCEPT" if decision.accepted else "REFUSE"
        click.echo(f"{verdict} {found.address}: {decision.reply.short} [{decision.rule}] {decision.reason}")
    raise click.exceptions.Exit(0 if decision.accepted else 1)


commands = domains
