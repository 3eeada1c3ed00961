"""``mssgw init``: create an operator's home folder (settings, database, development PKI), or join a node to it."""

from __future__ import annotations

import click

from cli.context import AppContext, pass_app
from gateway.operator import InitReport, init_operator


@click.command("init")
@click.option("--domain", help="The mail domain this operator serves (default: a.mssante.test).")
@click.option("--hostname", help="This gateway's host name, for its TLS certificate (default: localhost).")
@click.option("--force", is_flag=True,
              help="Rewrite mssgw.toml and regenerate the development PKI; on a database that already holds the "
                   "operator, rewrite mssgw.toml and re-issue this node's TLS certificate only.")
@pass_app
def init(app: AppContext, domain: str | None, hostname: str | None, force: bool) -> None:
    """Create (or bring up to date) the operator's home folder.

    On a database that already holds this operator (another node made it), the home joins it:
    the same CA and operator certificate, a TLS listener certificate of its own, nothing new in
    the directory.  The node's key-encryption key (keys.kek_file or MSSGW_KEK) must be the
    operator's; otherwise nothing is written."""
    report = init_operator(app.home, domain=domain, hostname=hostname, force=force)
    if report.joined:
        _joined(report)
        return
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


def _joined(report: InitReport) -> None:
    click.echo(f"joined operator {report.domain} (operator certificate {report.operator_fingerprint[:16]}..., "
               f"CA {report.ca_subject or 'not in the directory'}): no CA, operator key or directory row made")
    click.echo(f"home:      {report.home}")
    click.echo(f"settings:  {report.home / 'mssgw.toml'} ({'written' if report.config_written else 'kept'})")
    click.echo(f"database:  {report.database_url} (migrated)")
    click.echo(f"pki:       {report.pki_dir} ({', '.join(report.files_written) or 'up to date'})")
    if report.keys_sealed:
        click.echo(f"keys:      {report.keys_sealed} key file(s) of this home sealed in the database")
    if report.server_certificate == "issued":
        click.echo(f"tls:       {report.server_cert_path} issued for this node by the development CA")
    elif report.server_certificate == "kept":
        click.echo(f"tls:       {report.server_cert_path} kept")
    else:
        click.echo(f"tls:       no listener certificate: the CA's key is not in the database (a CA outside "
                   f"mssgw); put this node's certificate and key in {report.server_cert_path} and "
                   f"{report.pki_dir / 'server.key'} (or set tls.cert and tls.key) before 'mssgw serve'")


commands = init
