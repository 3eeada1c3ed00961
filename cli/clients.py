"""``mssgw clients``: what mail clients need to configure themselves (Thunderbird autoconfig, RFC 6186 SRV)."""

from __future__ import annotations

import click

from cli.context import AppContext, pass_app
from gateway.imap.autoconfig import autoconfig_xml, service_ports, srv_records


@click.group("clients")
def clients() -> None:
    """Mail client auto-configuration for our domains."""


@clients.command("autoconfig")
@click.option("--domain", help="One of our domains (default: the first).")
@pass_app
def autoconfig(app: AppContext, domain: str | None) -> None:
    """Print config-v1.1.xml, to publish at https://autoconfig.DOMAIN/mail/config-v1.1.xml."""
    settings = app.settings
    click.echo(autoconfig_xml(domain or settings.domains[0], settings.hostname, service_ports(settings)), nl=False)


@clients.command("srv")
@click.option("--domain", help="One of our domains (default: the first).")
@pass_app
def srv(app: AppContext, domain: str | None) -> None:
    """Print the RFC 6186 DNS SRV records for the domain's zone."""
    settings = app.settings
    click.echo(srv_records(domain or settings.domains[0], settings.hostname, service_ports(settings)), nl=False)


commands = clients
