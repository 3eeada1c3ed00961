"""``mssgw peers``: the other operators of the trust space, each connected in one command.

A thin shell over ``certs.peers``. Exit status, as everywhere in ``mssgw``: 0 done, 1 refused
or not found (``peers show/remove`` of an unknown domain), 2 usage or configuration error.
What is changed here reaches a running gateway within a few seconds (no restart).
"""

from __future__ import annotations

from pathlib import Path

import click

from certs import peers as svc
from cli.context import AppContext, pass_app
from cli.output import emit, emit_json, emit_record


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=what) from None


@click.group("peers")
def peers() -> None:
    """Peer operators: their CA, domains, route and certificate identity, in one step."""


@peers.command("add")
@click.argument("domain", required=False)
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The peer's CA certificate (PEM or DER): trusted for its TLS and S/MIME certificates.")
@click.option("--relay", help="HOST:PORT of the peer's inbound gateway.")
@click.option("--mx", "use_mx", is_flag=True, help="Route by the domain's MX records instead of --relay.")
@click.option("--operator-dn", help="The peer's operator certificate subject (MSSanté DNCertificatOperateur).")
@click.option("--operator-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="The peer's operator certificate: its subject is pinned, it encrypts mail to the peer's domain.")
@click.option("--from", "bundle_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file written by the peer's 'mssgw peers export' (CA, DN, domains, inbound address).")
@click.option("--require-encryption/--no-require-encryption", "require_encryption", default=None,
              help="Whether the peer's mail must be encrypted end to end (default for a new peer: yes). "
                   "--no-require-encryption accepts it signed over mutual TLS pinned to its identity "
                   "(the MSSanté model).")
@pass_app
def add(app: AppContext, domain: str | None, ca_file: Path | None, relay: str | None, use_mx: bool,
        operator_dn: str | None, operator_cert: Path | None, bundle_file: Path | None,
        require_encryption: bool | None) -> None:
    """Trust a peer operator's DOMAIN (or every domain of --from FILE); idempotent."""
    cert_pem = _read(operator_cert, "--operator-cert") if operator_cert else None
    if bundle_file is not None:
        bundle = svc.read_bundle(bundle_file)
        if domain is not None and domain.lower().rstrip(".") not in bundle.domains:
            raise click.UsageError(f"{domain} is not among the bundle's domains ({', '.join(bundle.domains)})")
        domains = [domain] if domain else bundle.domains
        ca_pem = _read(ca_file, "--ca") if ca_file else bundle.ca_pem
        if cert_pem is None and operator_dn is None:
            cert_pem = bundle.operator_cert_pem
        if relay is None and not use_mx:
            if bundle.inbound is None:
                raise click.UsageError("the bundle names no inbound address: give --relay HOST:PORT or --mx")
            relay = bundle.inbound
    else:
        if domain is None or ca_file is None:
            raise click.UsageError("give DOMAIN and --ca FILE, or --from FILE (a peer's 'mssgw peers export')")
        domains, ca_pem = [domain], _read(ca_file, "--ca")
    if relay is not None and use_mx:
        raise click.UsageError("--relay and --mx exclude each other")
    if relay is None and not use_mx:
        raise click.UsageError("give the peer's route: --relay HOST:PORT or --mx")
    if operator_dn is None and cert_pem is None:
        raise click.UsageError("pin the peer's identity: --operator-dn DN or --operator-cert FILE")
    with app.transaction() as session:
        rows = svc.add_peer(session, app.settings, domains, ca_pem=ca_pem, relay=relay, use_mx=use_mx,
                            operator_dn=operator_dn, operator_cert_pem=cert_pem,
                            require_encryption=require_encryption)  # fmt: skip
    for row in rows:
        mode = "" if row["require_encryption"] else "; signed over pinned mutual TLS, not encrypted end to end"
        click.echo(f"{row['domain']}: peer trusted ({row['route']}; operator {row['operator_dn']}{mode})")


@peers.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def list_(app: AppContext, as_json: bool) -> None:
    """List the peer operators' domains with their route, identity and CA."""
    with app.read() as session:
        rows = svc.list_peers(session)
    emit(rows, ("domain", "route", "operator_dn", "require_encryption", "ca"), as_json)


@peers.command("show")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def show(app: AppContext, domain: str, as_json: bool) -> None:
    """Show one peer domain: route, pinned identity, CA and operator certificate (exit 1 if unknown)."""
    with app.read() as session:  # an unknown domain: PeerNotFound, exit 1
        data = svc.peer_dict(session, domain)
    emit_record(data, as_json)


@peers.command("remove")
@click.argument("domain")
@pass_app
def remove(app: AppContext, domain: str) -> None:
    """Stop trusting a peer domain, with the CA and certificate it brought (exit 1 if unknown)."""
    with app.transaction() as session:
        gone = svc.remove_peer(session, domain)
    click.echo(f"{gone['domain']}: peer removed")


@peers.command("import-whitelist")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@pass_app
def import_whitelist(app: AppContext, file: Path, as_json: bool) -> None:
    """Load the MSSanté whitelist XML: every listed domain becomes a peer with its operator's identity.

    The whitelist names operators, not their CAs: they chain to IGC-Santé, added once with
    'mssgw certs trust-anchor add'.
    """
    from cli.domains import load_whitelist

    load_whitelist(app, file, as_json)


@peers.command("export")
@click.option("--inbound", help="HOST:PORT peers should relay to (default: listen.inbound, or hostname:port).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE instead of stdout.")
@pass_app
def export(app: AppContext, inbound: str | None, output: Path | None) -> None:
    """Print what a peer needs from us, for their 'mssgw peers add --from FILE' (no secret in it)."""
    import json

    data = svc.export_bundle(app.settings, inbound=inbound)
    if output is None:
        emit_json(data)
        return
    output.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    click.echo(f"peer bundle for {', '.join(data['domains'])} written to {output}")


commands = peers
