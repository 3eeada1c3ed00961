"""``mssgw certs``: certificates of mailboxes and domains, trust anchors, CRLs, OpenPGP keys.

Private keys are never printed: ``show --pem`` prints the public certificate,
``export --pkcs12`` writes the key and certificate to a file protected by a
passphrase read from standard input.  They are sealed in the database under the
key-encryption key (``seal-keys`` moves the key files of an older home in,
``rotate-kek`` re-seals everything under a new KEK in one transaction, ``secrets`` lists the
sealed rows and ``drop-secret`` deletes one that this node's KEK cannot open).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from certs import service as certs
from certs.pki import load_dev_pki
from cli.context import AppContext, pass_app
from cli.output import emit, emit_json, emit_record

COLUMNS = ("address", "purpose", "status", "not_after", "fingerprint")


@click.group("certs")
def certs_group() -> None:
    """X.509 certificates, trust anchors, CRLs and OpenPGP keys."""


@certs_group.command("issue")
@click.argument("address")
@click.option("--days", type=click.IntRange(min=1, max=3650), help="Validity in days (default: 2 years).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def issue(app: AppContext, address: str, days: int | None, as_json: bool) -> None:
    """Issue a certificate from the development CA for one of our mailboxes (user, organisation or application)."""
    with app.transaction() as session:
        data = certs.issue_for_mailbox(session, app.settings, address, days=days)
    emit_record(data, as_json) if as_json else click.echo(f"issued {data['fingerprint']} for {data['address']}")


@certs_group.command("import")
@click.argument("address")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--purpose", type=click.Choice(["smime", "tls-client"]), default="smime", show_default=True)
@click.option("--passphrase-stdin", is_flag=True, help="Read the PKCS#12 or key passphrase from standard input.")
@pass_app
def import_(app: AppContext, address: str, file: Path, purpose: str, passphrase_stdin: bool) -> None:
    """Import a certificate (PEM, DER or PKCS#12) for a mailbox or a domain."""
    password = sys.stdin.readline().rstrip("\r\n").encode() if passphrase_stdin else None
    with app.transaction() as session:
        data = certs.import_certificate(session, app.settings, address, file.read_bytes(), password=password,
                                        purpose=purpose)
    key = " with its private key" if data["has_private_key"] else ""
    click.echo(f"imported {data['fingerprint']} for {data['address']}{key}")


@certs_group.command("list")
@click.option("--address")
@click.option("--purpose")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def list_(app: AppContext, address: str | None, purpose: str | None, as_json: bool) -> None:
    """List certificates."""
    with app.transaction() as session:
        rows = certs.list_certificates(session, address=address, purpose=purpose)
    emit(rows, COLUMNS, as_json)


@certs_group.command("show")
@click.argument("selector")
@click.option("--pem", "as_pem", is_flag=True, help="Print the public certificate(s) in PEM.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def show(app: AppContext, selector: str, as_pem: bool, as_json: bool) -> None:
    """Show the certificates of an address, a domain or a fingerprint."""
    with app.transaction() as session:
        rows = certs.find(session, selector)
        data = [certs.certificate_dict(r, pem=as_pem) for r in rows]
    if as_pem and not as_json:
        for item in data:
            click.echo(item["pem"].rstrip())
        return
    if as_json:
        emit_json(data)
        return
    for item in data:
        emit_record(item, False)
        click.echo("")


@certs_group.command("revoke")
@click.argument("selector")
@click.option("--reason", default="unspecified", show_default=True,
              help="key_compromise, affiliation_changed, superseded, cessation_of_operation...")
@pass_app
def revoke(app: AppContext, selector: str, reason: str) -> None:
    """Revoke a certificate (address or fingerprint); the development CA's CRL is updated."""
    with app.transaction() as session:
        done = certs.revoke(session, app.settings, selector, reason=reason)
    for fpr in done:
        click.echo(f"revoked {fpr}")


@certs_group.command("ca")
@pass_app
def ca(app: AppContext) -> None:
    """Print the operator's CA certificate (public PEM), for peers to add as a trust anchor."""
    click.echo(load_dev_pki(app.settings.pki_dir).ca_cert.read_text().rstrip())


@certs_group.command("export")
@click.argument("address")
@click.option("--pkcs12", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (mode 0600).")
@pass_app
def export(app: AppContext, address: str, out: Path) -> None:
    """Write a mailbox's key and certificate as PKCS#12; the passphrase is read from standard input."""
    passphrase = sys.stdin.readline().rstrip("\r\n").encode()
    with app.transaction() as session:
        blob = certs.export_pkcs12(session, address, passphrase, app.settings)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(blob)
    click.echo(f"written {out}")


@certs_group.command("seal-keys")
@pass_app
def seal_keys(app: AppContext) -> None:
    """Move the private key files of an older home into the database, sealed (then remove the files).

    The TLS listener's key (pki/server.key) stays a file of each node."""
    with app.transaction() as session:
        report = certs.seal_key_files(session, app.settings)
    for path in report.files:  # committed: the database holds them now
        path.unlink(missing_ok=True)
    click.echo(f"sealed {len(report.sealed)} private key(s) in the database; {len(report.files)} key file(s) removed")
    if report.problems:
        raise certs.CertError(f"these key files cannot be read and stay as they are: {', '.join(report.problems)}")


@certs_group.command("secrets")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def sealed_secrets(app: AppContext, as_json: bool) -> None:
    """List the sealed secrets (names and KEK ids only), each tried with this node's KEK.

    ``opens``: fine.  ``other-kek``: sealed under a key-encryption key this node was not given
    (every new seal and every rotation is refused until it is re-sealed or dropped).  ``altered``:
    the row does not open under its own KEK.  When no row opens, this node's KEK is not the
    database's: the list is printed, then that error (exit status 2)."""
    from directory import secrets

    kek = secrets.load_kek(app.settings)
    with app.sessions() as session:
        entries = secrets.inventory(session, kek)
    emit([{"name": e.name, "kek_id": e.kek_id, "state": e.state} for e in entries], ("name", "kek_id", "state"),
         as_json)
    secrets.check_some_open(entries, kek)


@certs_group.command("drop-secret")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Confirm: the row's value is lost for good.")
@pass_app
def drop_secret(app: AppContext, name: str, yes: bool) -> None:
    """Delete one sealed secret that this node's KEK cannot open (``other-kek`` or ``altered``).

    A secret that opens is a key in use and is refused: revoke its certificate or key instead.
    Refused too when this node's KEK opens no row at all: it is not the database's KEK."""
    from directory import secrets

    if not yes:
        raise click.UsageError("dropping a sealed secret loses its value for good: add --yes")
    kek = secrets.load_kek(app.settings)
    with app.transaction() as session:
        entry = secrets.drop_unopenable(session, kek, name)
    click.echo(f"dropped sealed secret {entry.name} ({entry.state}, key-encryption key {entry.kek_id})")


@certs_group.command("rotate-kek")
@click.option("--new", "new_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the new key-encryption key (32 bytes, raw or base64).")
@pass_app
def rotate_kek(app: AppContext, new_file: Path) -> None:
    """Re-seal every secret under a new key-encryption key, in one transaction.

    The current KEK is this node's (MSSGW_KEK or keys.kek_file). Afterwards give every node the
    new one (replace the file or MSSGW_KEK) and restart them: a node still on the old KEK is
    told so in one sentence."""
    from directory import secrets

    old = secrets.load_kek(app.settings)
    new = secrets.load_kek(path=new_file, environ={})
    if new.id == old.id:
        raise certs.CertError("the new key-encryption key is the current one")
    with app.transaction() as session:
        count = secrets.rotate(session, old, new)
    click.echo(f"re-sealed {count} secret(s) under key-encryption key {new.id} (was {old.id}); "
               "now give every node the new key and restart it")


@certs_group.group("trust-anchor")
def trust_anchor() -> None:
    """CA certificates we trust for signatures and operator TLS (e.g. IGC-Santé, peers' CAs)."""


@trust_anchor.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--domain", "domains", multiple=True, metavar="DOMAIN",
              help="Trust the CA for S/MIME signatures of these mail domains only (a Direct trust bundle; "
                   "repeat for several). Without it, the CA vouches for every domain.")  # fmt: skip
@pass_app
def anchor_add(app: AppContext, file: Path, domains: tuple[str, ...]) -> None:
    """Trust a CA certificate (PEM or DER)."""
    data = file.read_bytes()
    with app.transaction() as session:
        added = [certs.add_trust_anchor(session, data, peer=d) for d in domains] or [certs.add_trust_anchor(session, data)]
    scope = f" for {', '.join(a['address'] for a in added)}" if domains else ""
    click.echo(f"trust anchor added{scope}: {added[0]['subject']} ({added[0]['fingerprint']})")


@trust_anchor.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def anchor_list(app: AppContext, as_json: bool) -> None:
    """List trust anchors."""
    with app.transaction() as session:
        rows = certs.list_certificates(session, purpose="anchor")
    for row in rows:
        row["domain"] = row["address"] or "*"  # the mail domain a scoped anchor vouches for
    emit(rows, ("subject", "domain", "status", "not_after", "fingerprint"), as_json)


@trust_anchor.command("remove")
@click.argument("fingerprint")
@pass_app
def anchor_remove(app: AppContext, fingerprint: str) -> None:
    """Stop trusting a CA (by fingerprint)."""
    with app.transaction() as session:
        certs.remove_trust_anchor(session, fingerprint)
    click.echo(f"trust anchor {fingerprint} removed")


@certs_group.group("crl")
def crl() -> None:
    """Certificate revocation lists."""


@crl.command("update")
@pass_app
def crl_update(app: AppContext) -> None:
    """Re-sign the development CA's CRL and refresh the cached CRLs of trust anchors."""
    path = certs.refresh_dev_crl(app.settings)
    click.echo(f"CRL re-signed: {path}")
    with app.transaction() as session:
        urls = certs.distribution_points(session)
    failed = 0
    for fetched in certs.fetch_crls(app.settings, urls):
        click.echo(f"{'fetched' if fetched.ok else 'FAILED '} {fetched.url}: {fetched.detail}")
        failed += not fetched.ok
    if failed:
        raise click.exceptions.Exit(1)


@certs_group.group("pgp")
def pgp() -> None:
    """OpenPGP keys of mailboxes (PGP/MIME where a recipient publishes a key)."""


@pgp.command("import")
@click.argument("address")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_app
def pgp_import(app: AppContext, address: str, file: Path) -> None:
    """Import an armored OpenPGP key for a mailbox (its user id must name the address)."""
    with app.transaction() as session:
        fingerprints = certs.pgp_import(session, app.settings, address, file.read_bytes())
    for fpr in fingerprints:
        click.echo(f"imported OpenPGP key {fpr} for {address.lower()}")


@pgp.command("generate")
@click.argument("address")
@pass_app
def pgp_generate(app: AppContext, address: str) -> None:
    """Create an OpenPGP key pair for one of our mailboxes."""
    with app.transaction() as session:
        fpr = certs.pgp_generate(session, app.settings, address)
    click.echo(f"generated OpenPGP key {fpr} for {address.lower()}")


@pgp.command("list")
@click.option("--address")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def pgp_list(app: AppContext, address: str | None, as_json: bool) -> None:
    """List OpenPGP keys."""
    with app.transaction() as session:
        rows = certs.pgp_list(session, address)
    emit(rows, ("address", "fingerprint", "has_secret", "status"), as_json)


@pgp.command("revoke")
@click.argument("fingerprint")
@pass_app
def pgp_revoke(app: AppContext, fingerprint: str) -> None:
    """Revoke an OpenPGP key."""
    with app.transaction() as session:
        certs.pgp_revoke(session, app.settings, fingerprint)
    click.echo(f"OpenPGP key {fingerprint} revoked")


commands = certs_group
