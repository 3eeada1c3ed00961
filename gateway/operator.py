"""Setting up an operator's home folder: settings, database, development PKI, key-encryption key; or a new node joining.

``mssgw init`` calls ``init_operator``.  It first opens the database (migrated to the newest
schema every time) and checks this node's key-encryption key (``DATA/kek`` or ``MSSGW_KEK``,
``directory.secrets``) before it writes anything in the home folder: a refused KEK leaves no
settings and no key file behind.

Two cases, told apart by the database:

* **A database without this operator's identity** (no ``sign`` certificate of the domain whose
  key is sealed): a first node.  The KEK is made when absent and the database holds no sealed
  secret yet; the development PKI is made (files kept unless ``force``); the operator
  certificate's and the CA's private keys are sealed in the database (the PKI folder keeps
  its own copies, a development artifact the gateway never reads once sealed); the CA, the
  operator and the server certificates are recorded; key files of an older home are moved
  into the database (``certs.service.seal_key_files``).
* **A database that holds it**: this home joins the operator.  The KEK must open the sealed
  operator key; the public PKI files (CA, operator certificate, CRL) are written from the
  database; the node's own TLS listener key and certificate are issued by the development CA
  whose key is sealed there (or, for a CA outside mssgw, the admin is told to provide them).
  Never a CA, an operator key or a directory row.  ``force`` here rewrites mssgw.toml and
  re-issues this node's listener certificate, never the operator's identity: a new CA or
  operator key would be one that no peer knows.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from directory import admin
from directory import secrets as sealed
from directory.certificates import register_certificate
from directory.db import make_engine, migrate, session_factory, transaction
from directory.identifiers import normalise_domain
from directory.models import Certificate
from gateway.config import CONFIG_NAME, Settings, load_settings, render_toml, validate
from gateway.core.errors import ConfigurationError
from gateway.core.keys import private_key_from_pem


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
    joined: bool = False  # the database already held the operator's identity: nothing of it was made
    domain: str = ""
    operator_fingerprint: str = ""
    ca_subject: str = ""
    ca_key_in_database: bool = False
    server_certificate: str = ""  # "issued", "kept", or "missing" (a CA outside mssgw: the admin provides it)
    server_cert_path: Path | None = None
    files_written: list[str] = field(default_factory=list)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _settings_for(home: Path, config_path: Path, domain: str | None, hostname: str | None,
                  rewrite: bool) -> tuple[Settings, str | None]:
    """The settings init works with, and the mssgw.toml text to write (None: the file is kept).

    Nothing is written here: the file waits until the key-encryption key has been checked."""
    if not rewrite:
        return load_settings(home), None
    overrides: dict[str, dict[str, object]] = {"operator": {}}
    if domain:
        overrides["operator"]["domains"] = [normalise_domain(domain)]
    if hostname:
        overrides["operator"]["hostname"] = hostname
    text = render_toml(overrides)
    return validate(tomllib.loads(text), home), text


def _write_config(config_path: Path, text: str) -> None:
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o600)
    tmp.replace(config_path)


def operator_identity(session: Session, domain: str) -> Certificate | None:
    """The operator certificate of ``domain`` whose private key is sealed in the database, if any:
    the identity every node of the operator shares (newest unrevoked ``sign`` row)."""
    rows = session.scalars(
        select(Certificate).where(Certificate.purpose == "sign", Certificate.address == domain,
                                  Certificate.revoked_at.is_(None)).order_by(Certificate.id.desc())
    )  # fmt: skip
    for row in rows:
        name = sealed.sealed_name(row.key_path)
        if name is not None and sealed.exists(session, name):
            return row
    return None


def _other_identity(session: Session) -> str | None:
    """The domain of another operator identity (a ``sign`` row with a sealed key) in the database."""
    rows = session.scalars(select(Certificate).where(Certificate.purpose == "sign", Certificate.address.is_not(None),
                                                     Certificate.revoked_at.is_(None)).order_by(Certificate.id))  # fmt: skip
    for row in rows:
        name = sealed.sealed_name(row.key_path)
        if name is not None and sealed.exists(session, name):
            return row.address
    return None


def _anchor_of(session: Session, operator: x509.Certificate) -> x509.Certificate | None:
    """The trust anchor (our CA) that issued the operator certificate."""
    rows = session.scalars(select(Certificate.pem).where(Certificate.purpose == "anchor",
                                                         Certificate.revoked_at.is_(None)).order_by(Certificate.id))  # fmt: skip
    for pem in rows:
        ca = x509.load_pem_x509_certificate(pem.encode("ascii"))
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            operator.verify_directly_issued_by(ca)
            return ca
    return None


def _chains_to(cert_path: Path, key_path: Path, ca: x509.Certificate) -> bool:
    """Whether the listener certificate file was issued by ``ca`` and its key file matches."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = private_key_from_pem(key_path.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):  # missing, unreadable, another CA: issue anew
        return False
    return key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def init_operator(
    home: Path, *, domain: str | None = None, hostname: str | None = None, force: bool = False
) -> InitReport:
    home_existed = home.exists()
    _private_dir(home)
    config_path = home / CONFIG_NAME
    try:
        settings, config_text = _settings_for(home, config_path, domain, hostname, force or not config_path.exists())
        engine = make_engine(settings.database_url)
    except Exception:
        if not home_existed:
            with contextlib.suppress(OSError):
                home.rmdir()  # a refused init leaves nothing, not even the empty folder
        raise
    try:
        migrate(engine)
        factory = session_factory(engine)
        with transaction(factory) as session:
            identity = operator_identity(session, settings.domains[0])
            if identity is not None:
                try:
                    kek = sealed.load_kek(settings)  # a joining node never makes a KEK of its own
                    sealed.check_kek(session, kek)
                    sealed.load_private_key(session, kek, identity.key_path or "")  # it must open the operator key
                except (sealed.KekError, sealed.SealedSecretError) as exc:
                    raise sealed.KekError(f"cannot join operator {settings.domains[0]} (its identity is in the "
                                          f"database; nothing was written): {exc}") from None
            else:
                other = _other_identity(session)
                if other is not None:  # a node started without --domain must not make a second operator
                    raise ConfigurationError(
                        f"this database holds operator {other}, not {settings.domains[0]}: run 'mssgw init "
                        f"--domain {other}' to join it (a database serves one operator); nothing was written")
        if identity is not None:
            return _join(settings, factory, config_path, config_text, force=force)
        return _create(settings, factory, config_path, config_text, force=force)
    except Exception:
        if not home_existed:
            with contextlib.suppress(OSError):
                home.rmdir()
        raise
    finally:
        engine.dispose()


def _create(settings: Settings, factory: sessionmaker[Session], config_path: Path, config_text: str | None, *,
            force: bool) -> InitReport:
    """A first node: the development PKI, the KEK when there is none, the identity sealed and recorded."""
    from certs.pki import create_dev_pki, dev_paths, load_private_key
    from certs.service import seal_key_files

    paths = dev_paths(settings.pki_dir)
    before = {p for p in settings.pki_dir.glob("*")} if settings.pki_dir.exists() else set()
    made_config = False
    try:
        with transaction(factory) as session:
            kek, kek_made = sealed.ensure_kek(session, settings)  # checked before any file is written
            if config_text is not None:
                _write_config(config_path, config_text)
                made_config = True
            for folder in (settings.mail_dir, settings.spool_dir, settings.keys_dir, settings.gnupg_dir):
                _private_dir(folder)
            dev = create_dev_pki(settings.pki_dir, settings.domains[0], settings.hostname, force=force)
            operator_cert = x509.load_pem_x509_certificate(dev.operator_cert.read_bytes())
            ca_cert = x509.load_pem_x509_certificate(dev.ca_cert.read_bytes())
            operator_key_path = sealed.seal_private_key(session, kek, operator_cert.fingerprint(hashes.SHA256()).hex(),
                                                        load_private_key(dev.operator_key))  # fmt: skip
            sealed.seal_private_key(session, kek, ca_cert.fingerprint(hashes.SHA256()).hex(),
                                    load_private_key(dev.ca_key))  # any node issues and revokes with it
            if not sealed.exists(session, sealed.SALT_NAME) and not (settings.keys_dir / "patient-pseudonym.salt").exists():
                # The patient-pseudonym salt is the operator's from its first day (an older home's file is
                # moved in by the first ``mssgw serve``): one found missing later was lost, and is said so.
                sealed.put(session, kek, sealed.SALT_NAME, os.urandom(32))
            for name in settings.domains:
                admin.add_local_domain(session, name)
            seeded = admin.seed_consumer_domains(session)
            registered = [
                register_certificate(session, dev.ca_cert.read_bytes(), address=None, purpose="anchor"),
                register_certificate(session, dev.operator_cert.read_bytes(), address=settings.domains[0],
                                     purpose="sign", key_path=operator_key_path),
                register_certificate(session, dev.server_cert.read_bytes(), address=settings.hostname,
                                     purpose="server", key_path=str(dev.server_key)),
            ]
            moved = seal_key_files(session, settings, pki_files=False)
    except Exception:
        # Nothing of a failed first init stays behind: above all no key file in clear.
        if settings.pki_dir.exists():
            for path in settings.pki_dir.glob("*"):
                if path not in before and path.is_file():
                    path.unlink(missing_ok=True)
        if made_config:
            config_path.unlink(missing_ok=True)
        raise
    for path in moved.files:  # committed: the database holds them now
        path.unlink(missing_ok=True)
    return InitReport(
        home=settings.home, config_written=config_text is not None, pki_dir=paths.directory,
        database_url=settings.database_url, seeded_blocklist=seeded, registered_certificates=registered,
        kek_path=sealed.kek_path(settings) if kek_made else None, keys_sealed=len(moved.sealed),
        domain=settings.domains[0], operator_fingerprint=registered[1],
        ca_subject=ca_cert.subject.rfc4514_string(), ca_key_in_database=True, server_certificate="issued",
        server_cert_path=dev.server_cert,
    )  # fmt: skip


def _join(settings: Settings, factory: sessionmaker[Session], config_path: Path, config_text: str | None, *,
          force: bool) -> InitReport:
    """Another node of an operator the database already holds: public files from the database, a
    listener certificate of its own, and nothing of the identity made again."""
    from certs import pki
    from certs.service import CertError, dev_ca, seal_key_files, write_dev_crl

    paths = pki.dev_paths(settings.pki_dir)
    written: list[str] = []
    with transaction(factory) as session:
        identity = operator_identity(session, settings.domains[0])
        assert identity is not None  # checked by the caller, in this same database
        operator = x509.load_pem_x509_certificate(identity.pem.encode("ascii"))
        ca = _anchor_of(session, operator)
        if config_text is not None:
            _write_config(config_path, config_text)
        for folder in (settings.mail_dir, settings.spool_dir, settings.keys_dir, settings.gnupg_dir):
            _private_dir(folder)
        _private_dir(paths.directory)
        operator_pem = operator.public_bytes(serialization.Encoding.PEM)
        if not paths.operator_cert.is_file() or paths.operator_cert.read_bytes() != operator_pem:
            pki.write_public(paths.operator_cert, operator_pem)
            written.append(paths.operator_cert.name)
        if ca is not None:
            ca_pem = ca.public_bytes(serialization.Encoding.PEM)
            if not paths.ca_cert.is_file() or paths.ca_cert.read_bytes() != ca_pem:
                pki.write_public(paths.ca_cert, ca_pem)
                written.append(paths.ca_cert.name)
        # An older first node's pki/ca.key (and operator.key) go into the database; the files stay.
        moved = seal_key_files(session, settings, pki_files=False)
        ca_key = None
        if ca is not None:
            with contextlib.suppress(CertError):
                ca_key = dev_ca(session, settings)
        cert_path = settings.path("tls", "cert", paths.server_cert)
        key_path = settings.path("tls", "key", paths.server_key)
        own_files = cert_path == paths.server_cert and key_path == paths.server_key
        if ca is not None and not force and _chains_to(cert_path, key_path, ca):
            server = "kept"
        elif ca_key is not None and own_files:
            pki.write_server_certificate(paths, ca_key.certificate, ca_key.key, settings.hostname, settings.domains[0])
            written += [paths.server_cert.name, paths.server_key.name]
            server = "issued"
        else:
            server = "kept" if cert_path.is_file() and key_path.is_file() else "missing"
        if ca_key is not None:
            write_dev_crl(session, ca_key)
            written.append(paths.crl.name)
    for path in moved.files:
        path.unlink(missing_ok=True)
    return InitReport(
        home=settings.home, config_written=config_text is not None, pki_dir=paths.directory,
        database_url=settings.database_url, seeded_blocklist=0, keys_sealed=len(moved.sealed), joined=True,
        domain=settings.domains[0], operator_fingerprint=identity.fingerprint,
        ca_subject=ca.subject.rfc4514_string() if ca is not None else "", ca_key_in_database=ca_key is not None,
        server_certificate=server, server_cert_path=cert_path, files_written=written,
    )  # fmt: skip
