"""Setting up an operator's home folder: settings, database, development PKI, key-encryption key.

``mssgw init`` calls ``init_operator``. It is idempotent: an existing
``mssgw.toml`` and existing keys are kept unless ``force`` is given; the
database is migrated to the newest schema every time.  The key-encryption key
(``DATA/kek``, ``directory.secrets``) is made when absent and the database holds no
sealed secret yet; the operator certificate's private key is sealed in the database
(the development PKI folder keeps its own copy, as it keeps the CA's key: a
development artifact, never read by the gateway once the key is sealed), and key
files of an older home are moved into the database (``certs.service.seal_key_files``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from directory import admin
from directory import secrets as sealed
from directory.certificates import register_certificate
from directory.db import make_engine, migrate, session_factory, transaction
from directory.identifiers import normalise_domain
from gateway.config import CONFIG_NAME, Settings, load_settings, render_toml


@dataclass
class InitReport:
    home: Path
    config_written: bool
    pki_dir: Path
    database_url: str
    seeded_blocklist: int
    registered_certificates: list[str] = field(default_factory=list)
    kek_path: Path | None = None  # the key-encryption key made now (None: one was given)
    keys_sealed: int = 0  # key files of an older home moved into the database


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def init_operator(
    home: Path, *, domain: str | None = None, hostname: str | None = None, force: bool = False
) -> InitReport:
    from certs.pki import create_dev_pki, load_private_key
    from certs.service import seal_key_files

    _private_dir(home)
    config_path = home / CONFIG_NAME
    written = False
    if force or not config_path.exists():
        overrides: dict[str, dict[str, object]] = {"operator": {}}
        if domain:
            overrides["operator"]["domains"] = [normalise_domain(domain)]
        if hostname:
            overrides["operator"]["hostname"] = hostname
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(render_toml(overrides), encoding="utf-8")
        os.chmod(tmp, 0o600)
        tmp.replace(config_path)
        written = True
    settings: Settings = load_settings(home)
    for folder in (settings.mail_dir, settings.spool_dir, settings.keys_dir, settings.gnupg_dir):
        _private_dir(folder)
    pki = create_dev_pki(settings.pki_dir, settings.domains[0], settings.hostname, force=force)

    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
        with transaction(session_factory(engine)) as session:
            kek, kek_made = sealed.ensure_kek(session, settings)
            operator_cert = x509.load_pem_x509_certificate(pki.operator_cert.read_bytes())
            operator_key_path = sealed.seal_private_key(session, kek, operator_cert.fingerprint(hashes.SHA256()).hex(),
                                                        load_private_key(pki.operator_key))  # fmt: skip
            for name in settings.domains:
                admin.add_local_domain(session, name)
            seeded = admin.seed_consumer_domains(session)
            registered = [
                register_certificate(session, pki.ca_cert.read_bytes(), address=None, purpose="anchor"),
                register_certificate(
                    session,
                    pki.operator_cert.read_bytes(),
                    address=settings.domains[0],
                    purpose="sign",
                    key_path=operator_key_path,
                ),
                register_certificate(
                    session, pki.server_cert.read_bytes(), address=settings.hostname, purpose="server",
                    key_path=str(pki.server_key),
                ),
            ]
            moved = seal_key_files(session, settings)
        for path in moved.files:  # committed: the database holds them now
            path.unlink(missing_ok=True)
    finally:
        engine.dispose()
    return InitReport(
        home=home,
        config_written=written,
        pki_dir=pki.directory,
        database_url=settings.database_url,
        seeded_blocklist=seeded,
        registered_certificates=registered,
        kek_path=sealed.kek_path(settings) if kek_made else None,
        keys_sealed=len(moved.sealed),
    )
