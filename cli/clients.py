"""``mssgw clients``: what mail clients need to configure themselves (Thunderbird autoconfig, RFC 6186 SRV).

Only for our own domains (``operator.domains``): an autoconfig file or SRV records for another
operator's domain would point its clinicians' mail clients, and their passwords, at our servers.
Another domain, or a malformed one, is a usage error (exit 2) naming our domains.
"""

from __future__ import annotations

import click

from cli.context import AppContext, pass_app
from gateway.config import Settings
from gateway.imap.autoconfig import autoconfig_xml, service_ports, srv_records


def _our_domain(settings: Settings, domain: str | None) -> str:
    """``domain`` when it is one of ours (case and a final dot aside), else the first of ours."""
    if domain is None:
        return settings.domains[0]
    wanted = domain.strip().rstrip(".").lower()
    if wanted not in settings.domains:
        raise click.BadParameter(f"{domain!r} is not one of our domains ({', '.join(settings.domains)}): "
                                 "clients of another operator's domain must not be sent to our servers",
                                 param_hint="--domain")  # fmt: skip
    return wanted


@click.group("clients")
def clients() -> None:
    """Mail client auto-configuration for our domains."""


@clients.command("autoconfig")
@click.option("--domain", help="One of our domains (default: the first).")
@pass_app
def autoconfig(app: AppContext, domain: str | None) -> None:
    """Print config-v1.1.xml, to publish at https://autoconfig.DOMAIN/mail/config-v1.1.xml."""
    settings = app.settings
    click.echo(autoconfig_xml(_our_domain(settings, domain), settings.hostname, service_ports(settings)), nl=False)


@clients.command("srv")
@click.option("--domain", help="One of our domains (default: the first).")
@pass_app
def srv(app: AppContext, domain: str | None) -> None:
    """Print the RFC 6186 DNS SRV records for the domain's zone."""
    settings = app.settings
    click.echo(srv_records(_our_domain(settings, domain), settings.hostname, service_ports(settings)), nl=False)


commands = clients
