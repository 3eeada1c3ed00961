"""``mssgw directory``: practitioners, mailboxes, passwords, delegations, imports."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import click

from cli.context import AppContext, pass_app
from cli.output import emit, emit_json, emit_record
from directory import admin

LIST_COLUMNS = ("address", "type", "local", "active", "display_name", "rpps")


def _read_password_stdin() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.UsageError("no password on standard input")
    return password


@click.group("directory")
def directory() -> None:
    """Practitioners and mailboxes of the health directory."""


@directory.command("add-practitioner")
@click.option("--rpps", help="RPPS number (11 digits, Luhn check digit).")
@click.option("--adeli", help="ADELI number (9 digits), for professions without RPPS.")
@click.option("--last-name", required=True)
@click.option("--first-name", required=True)
@click.option("--profession", "profession", help="Profession code (e.g. 10 = physician) or label.")
@click.option("--specialty", help="Specialty (savoir-faire) code or label.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def add_practitioner(app: AppContext, rpps: str | None, adeli: str | None, last_name: str, first_name: str,
                     profession: str | None, specialty: str | None, as_json: bool) -> None:
    """Add (or update) a practitioner."""
    if bool(rpps) == bool(adeli):
        raise click.UsageError("give exactly one of --rpps or --adeli")
    with app.transaction() as session:
        row = admin.add_practitioner(
            session,
            id_type="RPPS" if rpps else "ADELI",
            identifier=rpps or adeli or "",
            last_name=last_name,
            first_name=first_name,
            profession_code=profession if profession and profession.isdigit() else None,
            profession_label=profession if profession and not profession.isdigit() else None,
            specialty_code=specialty,
        )
        data = {"id_type": row.id_type, "identifier": row.identifier, "national_id": row.national_id,
                "last_name": row.last_name, "first_name": row.first_name}
    emit_record(data, as_json) if as_json else click.echo(f"practitioner {data['national_id']} saved")


@directory.command("add-mailbox")
@click.argument("address")
@click.option("--type", "mailbox_type", type=click.Choice(["PER", "ORG", "APP"], case_sensitive=False), required=True)
@click.option("--rpps", help="The practitioner owning a PER mailbox.")
@click.option("--name", "display_name", help="Display name (ORG and APP mailboxes).")
@click.option("--password-stdin", is_flag=True, help="Read the mailbox password from standard input.")
@pass_app
def add_mailbox(app: AppContext, address: str, mailbox_type: str, rpps: str | None, display_name: str | None,
                password_stdin: bool) -> None:
    """Add (or update) a mailbox of ours or a trusted operator's."""
    password = _read_password_stdin() if password_stdin else None
    with app.transaction() as session:
        row = admin.add_mailbox(session, address, type=mailbox_type, rpps=rpps, display_name=display_name,
                                password=password)
        where = "local" if row.local else "remote"
        click.echo(f"mailbox {row.address} saved ({row.type.value}, {where})")


@directory.command("set-password")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, required=True, help="Read the new password from standard input.")
@pass_app
def set_password(app: AppContext, address: str, password_stdin: bool) -> None:
    """Set a local mailbox's password (read from standard input, never from the command line)."""
    password = _read_password_stdin()
    with app.transaction() as session:
        admin.set_password(session, address, password)
    click.echo(f"password of {address.lower()} updated")


@directory.command("delegate")
@click.argument("mailbox")
@click.argument("delegate_to")
@click.option("--revoke", is_flag=True, help="Take the delegation back.")
@pass_app
def delegate(app: AppContext, mailbox: str, delegate_to: str, revoke: bool) -> None:
    """Let DELEGATE_TO send as (and read) MAILBOX, usually an ORG mailbox."""
    with app.transaction() as session:
        admin.delegate(session, mailbox, delegate_to, revoke=revoke)
    click.echo(f"{delegate_to.lower()} {'may no longer' if revoke else 'may now'} act for {mailbox.lower()}")


@directory.command("deactivate")
@click.argument("address")
@pass_app
def deactivate(app: AppContext, address: str) -> None:
    """Deactivate a mailbox: it no longer receives, sends or logs in."""
    with app.transaction() as session:
        admin.set_active(session, address, False)
    click.echo(f"mailbox {address.lower()} deactivated")


@directory.command("activate")
@click.argument("address")
@pass_app
def activate(app: AppContext, address: str) -> None:
    """Reactivate a mailbox."""
    with app.transaction() as session:
        admin.set_active(session, address, True)
    click.echo(f"mailbox {address.lower()} activated")


@directory.command("sent-copy")
@click.argument("address")
@click.argument("choice", type=click.Choice(["on", "off", "default"], case_sensitive=False))
@pass_app
def sent_copy(app: AppContext, address: str, choice: str) -> None:
    """Whether the gateway files a copy of what ADDRESS sends in its Sent folder.

    "default" follows mailboxes.server_sent_copy (mailbox types whose senders are software);
    "off" suits people whose mail client saves its own copy, "on" software that saves none."""
    value = {"on": True, "off": False}.get(choice.lower())
    with app.transaction() as session:
        admin.set_sent_copy(session, address, value)
    click.echo(f"Sent copy of {address.lower()}: {choice.lower()}")


@directory.command("show")
@click.argument("address")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def show(app: AppContext, address: str, as_json: bool) -> None:
    """Everything the directory knows about a mailbox (never its password)."""
    with app.read() as session:
        data = admin.mailbox_dict(session, admin.get_mailbox(session, address), detail=True)
    emit_record(data, as_json)


@directory.command("list")
@click.option("--domain")
@click.option("--type", "mailbox_type", type=click.Choice(["PER", "ORG", "APP"], case_sensitive=False))
@click.option("--local", "local_only", is_flag=True, help="Only this operator's mailboxes.")
@click.option("--limit", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def list_(app: AppContext, domain: str | None, mailbox_type: str | None, local_only: bool, limit: int | None,
          as_json: bool) -> None:
    """List mailboxes."""
    with app.read() as session:
        rows = admin.list_mailboxes(session, domain=domain, type=mailbox_type, local_only=local_only, limit=limit)
    emit(rows, LIST_COLUMNS, as_json)


@directory.command("search")
@click.argument("text")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def search(app: AppContext, text: str, limit: int, as_json: bool) -> None:
    """Find mailboxes by address, name, RPPS or organisation."""
    with app.read() as session:
        rows = admin.search(session, text, limit=limit)
    emit(rows, LIST_COLUMNS, as_json)


@directory.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1), default=5000, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def import_(app: AppContext, file: Path, batch_size: int, quiet: bool, as_json: bool) -> None:
    """Import a national directory extract (MSSanté mailboxes or RPPS); the kind is read from its header."""
    from directory.importers import import_file

    report = import_file(app.sessions, file, local_domains=app.settings.domains, progress=not quiet and not as_json,
                         batch_size=batch_size)
    if as_json:
        emit_json(report.as_dict())
        return
    click.echo(report.summary())
    for line_no, reason in report.skipped[:50]:
        click.echo(f"  line {line_no}: {reason}", err=True)
    if len(report.skipped) > 50:
        click.echo(f"  ... and {len(report.skipped) - 50} more bad lines", err=True)


@directory.command("export")
@click.option("--format", "fmt", type=click.Choice(["json", "mss"]), default="json", show_default=True)
@click.option("--local", "local_only", is_flag=True, help="Only this operator's mailboxes.")
@click.option("--output", "-o", type=click.File("w", encoding="utf-8"), default="-")
@pass_app
def export(app: AppContext, fmt: str, local_only: bool, output: TextIO) -> None:
    """Export mailboxes as JSON lines or in the MSSanté extract format."""
    from directory.importers import export_directory

    with app.transaction() as session:
        count = export_directory(session, output, fmt=fmt, local_only=local_only)
    click.echo(f"{count} mailboxes exported", err=True)


commands = directory
