"""``mssgw init``: create an operator's home folder (settings, database, development PKI)."""

from __future__ import annotations

import click

from cli.context import AppContext, pass_app
from gateway.operator import init_operator


@click.command("init")
@click.option("--domain", help="The mail domain this operator serves (default: a.mssante.test).")
@click.option("--hostname", help="This gateway's host name, for its TLS certificate (default: localhost).")
@click.option("--force", is_flag=True, help="Rewrite mssgw.toml and regenerate the development PKI.")
@pass_app
def init(app: AppContext, domain: str | None, hostname: str | None, force: bool) -> None:
    """Create (or bring up to date) the operator's home folder."""
    report = init_operator(app.home, domain=domain, hostname=hostname, force=force)
    click.echo(f"home:      {report.home}")
    click.echo(f"settings:  {report.home / 'mssgw.toml'} ({'written' if report.config_written else 'kept'})")
    click.echo(f"database:  {report.database_url} (migrated)")
    click.echo(f"dev PKI:   {report.pki_dir}")
    if report.kek_path is not None:
        click.echo(f"kek:       {report.kek_path} (made now: every node of this database needs this same key; "
                   "keep a copy apart from the database backups)")
    if report.keys_sealed:
        click.echo(f"keys:      {report.keys_sealed} key file(s) moved into the database, sealed")
    if report.seeded_blocklist:
        click.echo(f"blocklist: {report.seeded_blocklist} consumer mail providers seeded")


commands = init
