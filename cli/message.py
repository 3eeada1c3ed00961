"""``mssgw message compose|protect|open``: build a health-document message, sign+encrypt or decrypt+verify one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.context import AppContext, pass_app
from gateway.documents.cda import Author, Patient
from gateway.documents.compose import ComposeError, ComposeRequest, compose
from gateway.documents.ins import InsError, parse_ins
from gateway.process.manual import ManualError, open_message, protect_message


@click.group("message")
def message() -> None:
    """Compose, protect or open one message as the gateway would (for admins and integrators)."""


#: Bounds of the files compose reads (a PDF and a CDA travel inside one message).
MAX_PDF_BYTES = 20 * 1024 * 1024
MAX_CDA_BYTES = 30 * 1024 * 1024


def _read_file(path: str, limit: int, what: str) -> bytes:
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > limit:
            raise click.UsageError(f"{what} is larger than {limit} bytes")
        return file.read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {what}: {exc.strerror}") from None


def _author_of(app: AppContext, sender: str, rpps: str | None) -> Author:
    """The author as the directory knows the sending mailbox (its practitioner), else ``--author-rpps`` alone."""
    from directory.admin import get_mailbox
    from gateway.core.errors import NotFoundError

    try:
        with app.read() as db:
            box = get_mailbox(db, sender)
            person = box.practitioner
            organisation = box.organisation.name if box.organisation is not None else ""
            if person is not None and person.id_type == "RPPS":
                return Author(rpps or person.identifier, person.last_name, person.first_name, organisation)
            return Author(rpps, organisation=organisation or (box.display_name or ""))
    except NotFoundError:
        return Author(rpps)


@message.command("compose")
@click.option("--from", "sender", required=True, help="The sending mailbox.")
@click.option("--to", "recipients", required=True, multiple=True, help="A recipient (repeatable).")
@click.option("--pdf", "pdf_path", required=True, type=click.Path(dir_okay=False), help="The document (PDF).")
@click.option("--cda", "cda_path", type=click.Path(dir_okay=False),
              help="A CDA R2 document to send; without it a level 1 CDA wraps the PDF.")
@click.option("--ins", "ins", required=True, help="The patient's INS (NIR, 15 characters with its key).")
@click.option("--ins-oid", default="real", show_default=True,
              help="Authority of the INS: real, test, demo or the OID (1.2.250.1.213.1.4.8/.10/.11).")
@click.option("--loinc", required=True, help="Document type (LOINC code, e.g. 57833-6 for a prescription).")
@click.option("--subject", default="", help="Subject and document title (default: the document type).")
@click.option("--patient-family", default="", help="Patient's birth name (for a qualified INS).")
@click.option("--patient-given", default="", help="Patient's first given name.")
@click.option("--birth-date", default="", help="Patient's birth date, YYYYMMDD.")
@click.option("--gender", type=click.Choice(["F", "M", "U"]), default=None, help="Patient's sex.")
@click.option("--author-rpps", default=None, help="Author's RPPS (default: the directory's for --from).")
@click.option("--block-reply", is_flag=True, help="To a patient's mailbox: X-MSS-MES: FIN (no reply).")
@pass_app
def compose_(app: AppContext, sender: str, recipients: tuple[str, ...], pdf_path: str, cda_path: str | None,
             ins: str, ins_oid: str, loinc: str, subject: str, patient_family: str, patient_given: str,
             birth_date: str, gender: str | None, author_rpps: str | None, block_reply: bool) -> None:
    """Write a message with an IHE XDM package (CDA + PDF) on stdout, ready for protect or submission."""
    try:
        patient_ins = parse_ins(ins, ins_oid)
    except InsError as exc:
        raise click.UsageError(f"--ins/--ins-oid: {exc}") from None
    if birth_date and (len(birth_date) != 8 or not birth_date.isdigit()):
        raise click.UsageError("--birth-date: expected YYYYMMDD")
    if author_rpps is not None and (len(author_rpps) != 11 or not author_rpps.isdigit()):
        raise click.UsageError("--author-rpps: an RPPS number has 11 digits")
    pdf = _read_file(pdf_path, MAX_PDF_BYTES, "--pdf")
    cda = _read_file(cda_path, MAX_CDA_BYTES, "--cda") if cda_path else None
    request = ComposeRequest(
        sender=sender.lower(), recipients=tuple(r.lower() for r in recipients), pdf=pdf,
        pdf_name=Path(pdf_path).name, patient=Patient(patient_ins, patient_family, patient_given, birth_date,
                                                      gender or ""),
        loinc=loinc.strip(), subject=subject, cda=cda, author=_author_of(app, sender, author_rpps),
        block_reply=block_reply)
    try:
        out = compose(request)
    except ComposeError as exc:
        raise click.ClickException(str(exc)) from None
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()


@message.command("protect")
@click.option("--from", "sender", required=True, help="The sending mailbox (its certificate signs).")
@click.option("--to", "recipients", required=True, multiple=True, help="A recipient (repeatable).")
@pass_app
def protect(app: AppContext, sender: str, recipients: tuple[str, ...]) -> None:
    """Read a message on stdin, write it signed and encrypted on stdout."""
    data = sys.stdin.buffer.read()
    if not data.strip():
        raise click.UsageError("no message on standard input")
    try:
        out, method = protect_message(app.settings, app.sessions, data, sender=sender.lower(),
                                      recipients=[r.lower() for r in recipients])
    except ManualError as exc:
        raise click.ClickException(str(exc)) from None
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    click.echo(f"protected with {method} for {len(recipients)} recipient(s)", err=True)


@message.command("open")
@click.option("--to", "recipient", required=True, help="Our mailbox the message is for.")
@click.option("--json", "as_json", is_flag=True, help="Print the verification result as JSON on stderr.")
@pass_app
def open_(app: AppContext, recipient: str, as_json: bool) -> None:
    """Read a protected message on stdin; print the recovered message; exit 0 only if it is valid and trusted."""
    data = sys.stdin.buffer.read()
    try:
        inner, result = open_message(app.settings, app.sessions, data, recipient=recipient.lower())
    except ManualError as exc:
        raise click.ClickException(str(exc)) from None
    if inner is not None:
        sys.stdout.buffer.write(inner)
        sys.stdout.buffer.flush()
    if as_json:
        click.echo(json.dumps({"ok": result.ok, **result.audit_fields()}, default=str), err=True)
    else:
        click.echo(f"Authentication-Results: {result.auth_results_header(app.settings.hostname)}", err=True)
    raise click.exceptions.Exit(0 if result.ok else 1)


commands = message
