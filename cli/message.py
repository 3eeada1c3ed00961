"""``mssgw message protect|open``: sign+encrypt or decrypt+verify one message from standard input."""

from __future__ import annotations

import json
import sys

import click

from cli.context import AppContext, pass_app
from gateway.process.manual import ManualError, open_message, protect_message


@click.group("message")
def message() -> None:
    """Protect or open one message as the gateway would (for admins and integrators)."""


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
