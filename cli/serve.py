"""``mssgw serve``: run the gateway (SMTP listeners, queue workers, IMAP, metrics) until SIGTERM/SIGINT.

Logs go to stderr as ``key=value`` lines, one per listener at start and one per
transaction outcome, never message content. A start problem (a port taken, a
certificate missing or expired, a database that cannot be migrated) is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import logging
import sys

import click

from cli.context import AppContext, pass_app

EXIT_START_FAILED = 2


def configure_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # aiosmtpd logs every command line at INFO: addresses are ours to log, in our format.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.command("serve")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]),
              show_default=True)
@click.option("--no-workers", is_flag=True,
              help="Accept and queue only (an edge node: another node sharing the database delivers).")
@pass_app
def serve(app: AppContext, log_level: str, no_workers: bool) -> None:
    """Run the gateway in the foreground (stop it with SIGTERM or Ctrl-C)."""
    from gateway.app import Gateway, GatewayStartError

    configure_logging(log_level)
    try:
        Gateway(app.settings, workers=not no_workers).run_forever()
    except GatewayStartError as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(EXIT_START_FAILED) from None


commands = serve
