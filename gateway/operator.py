"""Setting up an operator's home folder: settings, database, development PKI.

``mssgw init`` calls ``init_operator``. It is idempotent: an existing
``mssgw.toml`` and existing keys are kept unless ``force`` is given; the
database is migrated to the newest schema every time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from directory import admin
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


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def init_operator(
    home: Path, *, domain: str | None = None, hostname: str | None = None, force: bool = False
) -> InitReport:
    from certs.pki import create_dev_pki

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
                    key_path=str(pki.operator_key),
                ),
                register_certificate(
                    session, pki.server_cert.read_bytes(), address=settings.hostname, purpose="server",
                    key_path=str(pki.server_key),
                ),
            ]
    finally:
        engine.dispose()
    return InitReport(
        home=home,
        config_written=written,
        pki_dir=pki.directory,
        database_url=settings.database_url,
        seeded_blocklist=seeded,
        registered_certificates=registered,
    )
