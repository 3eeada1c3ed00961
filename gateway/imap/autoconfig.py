"""Mail client auto-configuration: Thunderbird's ``config-v1.1.xml`` and the RFC 6186 SRV records.

``autoconfig_xml`` renders the document Thunderbird (and other clients reading
the Mozilla ISPDB format) fetch from
``https://autoconfig.<domain>/mail/config-v1.1.xml``: IMAP over implicit TLS
(``listen.imaps``) first, IMAP with STARTTLS second, then SMTP submission over
implicit TLS (RFC 8314) and with STARTTLS; the user name is the full address.
``srv_records`` renders the RFC 6186 (+ RFC 8314 section 5.1) DNS records that
let other clients find the same services. Ports come from the settings (their
public values may differ behind a proxy: pass ``ports`` to override).

Errors: ``InvalidIdentifier`` for a domain that is not a valid name.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from directory.identifiers import normalise_domain
from gateway.config import Settings

__all__ = ["autoconfig_xml", "service_ports", "srv_records"]


def service_ports(settings: Settings) -> dict[str, int]:
    """Public ports per service name (imaps, imap, submissions, submission) from ``[listen]``."""
    defaults = {"imaps": 1993, "imap": 1143, "submissions": 1465, "submission": 1587}
    ports = {}
    for name, default in defaults.items():
        where = settings.listen(name)
        ports[name] = where[1] if where else default
    return ports


def autoconfig_xml(domain: str, hostname: str, ports: dict[str, int], *, display_name: str = "") -> str:
    """Thunderbird's config-v1.1.xml for ``domain``, served by ``hostname``."""
    dom = escape(normalise_domain(domain))
    host = escape(hostname)
    label = escape(display_name or f"Messagerie securisee de sante ({domain})")

    def server(direction: str, kind: str, port: int, socket_type: str) -> str:
        return (
            f'    <{direction}Server type="{kind}">\n'
            f"      <hostname>{host}</hostname>\n"
            f"      <port>{port}</port>\n"
            f"      <socketType>{socket_type}</socketType>\n"
            f"      <username>%EMAILADDRESS%</username>\n"
            f"      <authentication>password-cleartext</authentication>\n"
            f"    </{direction}Server>\n"
        )

    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<clientConfig version="1.1">\n'
        f'  <emailProvider id="{dom}">\n'
        f"    <domain>{dom}</domain>\n"
        f"    <displayName>{label}</displayName>\n"
        f"    <displayShortName>{dom}</displayShortName>\n"
        + server("incoming", "imap", ports["imaps"], "SSL")
        + server("incoming", "imap", ports["imap"], "STARTTLS")
        + server("outgoing", "smtp", ports["submissions"], "SSL")
        + server("outgoing", "smtp", ports["submission"], "STARTTLS")
        + "  </emailProvider>\n"
        "</clientConfig>\n"
    )


def srv_records(domain: str, hostname: str, ports: dict[str, int], *, ttl: int = 3600) -> str:
    """RFC 6186 SRV records in zone-file syntax; implicit TLS is preferred (lower priority value)."""
    dom = normalise_domain(domain)
    target = hostname.rstrip(".") + "."
    rows = [
        ("_imaps._tcp", 0, ports["imaps"]),
        ("_imap._tcp", 10, ports["imap"]),
        ("_submissions._tcp", 0, ports["submissions"]),
        ("_submission._tcp", 10, ports["submission"]),
        ("_pop3._tcp", 0, 0),  # RFC 6186 section 4: "." target = service not offered
        ("_pop3s._tcp", 0, 0),
    ]
    lines = []
    for label, priority, port in rows:
        where = f"{port} {target}" if port else "0 ."
        lines.append(f"{label}.{dom}. {ttl} IN SRV {priority} 1 {where}")
    return "\n".join(lines) + "\n"
