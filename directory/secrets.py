"""Sealing secrets in the database under a key-encryption key (KEK) that each node holds and the database never does.

Why: nodes that share one PostgreSQL and no disk must each sign, decrypt and pseudonymise with the
same private keys, OpenPGP secret keys and salt.  Each secret is one ``sealed_secrets`` row:
AES-256-GCM (NIST SP 800-38D) under the KEK, a fresh 96-bit random nonce per sealing, and the
row's name as additional authenticated data, so a row's ciphertext copied under another name
(say, an attacker's key under our operator key's name) does not open.  Someone who reads the
database, a dump or a backup learns nothing without a node's KEK.  The development CA's key is a
``key:<fingerprint>`` row like any certificate's, so every node issues and revokes with it.

The KEK: ``MSSGW_KEK`` (base64 of 32 bytes) when set, else the file ``keys.kek_file`` (default
``DATA/kek``, 32 raw bytes or their base64, mode 0600, made by ``mssgw init``).  Each row records
the KEK's id (16 hex digits of a SHA-256 over a label and the KEK: it names the KEK without
revealing it), so a node given another KEK is told so in one sentence rather than seeing an
authentication failure.  ``Kek`` refuses to be pickled: worker processes load it themselves.

Errors: ``KekError`` (a ``ConfigurationError``: the KEK is missing, malformed or not the one the
rows were sealed with), ``SealedSecretError`` (a row does not open under the right KEK: altered
or swapped).  No message ever holds key material.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from directory.models import SealedSecret
from gateway.config import Settings
from gateway.core.errors import ConfigurationError, DirectoryError
from gateway.core.keys import private_key_from_der, private_key_from_pem

__all__ = [
    "KEK_ENV",
    "SEALED_PREFIX",
    "Kek",
    "KekError",
    "SealedEntry",
    "SealedSecretError",
    "SecretNotDropped",
    "check_some_open",
    "create_kek_file",
    "drop_unopenable",
    "exists",
    "inventory",
    "kek_path",
    "key_name",
    "load_kek",
    "load_private_key",
    "names",
    "open_sealed",
    "put",
    "read",
    "rotate",
    "seal_private_key",
    "sealed_name",
    "sealed_ref",
    "sealed_row",
]

log = logging.getLogger("mssgw.keys")

KEK_ENV = "MSSGW_KEK"
KEK_BYTES = 32
NONCE_BYTES = 12
#: ``Certificate.key_path`` of a key held in ``sealed_secrets`` (``sealed:key:<fingerprint>``).
SEALED_PREFIX = "sealed:"
_ID_LABEL = b"mssgw key-encryption key id\x00"
_GIVE_SAME = "give every node the same kek (keys.kek_file or MSSGW_KEK)"


class KekError(ConfigurationError):
    """The key-encryption key is missing, malformed, or not the one the secrets were sealed with."""


class SealedSecretError(DirectoryError):
    """A sealed row does not open under the right KEK: it was altered, or copied under another name."""


def kek_id_of(key: bytes) -> str:
    return hashlib.sha256(_ID_LABEL + key).hexdigest()[:16]


@dataclass(frozen=True, repr=False, eq=False)
class Kek:
    """A node's key-encryption key; never printed, never pickled."""

    key: bytes
    source: str  # "MSSGW_KEK" or the file it came from

    @property
    def id(self) -> str:
        return kek_id_of(self.key)

    def __repr__(self) -> str:
        return f"Kek(id={self.id}, source={self.source})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a key-encryption key is never pickled: each process loads it from its settings")


def kek_path(settings: Settings) -> Path:
    """``keys.kek_file``, relative to the home folder; ``DATA/kek`` when empty."""
    return settings.path("keys", "kek_file", settings.home / "kek")


def _parse(data: bytes, where: str) -> bytes:
    if len(data) == KEK_BYTES:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEK_BYTES:
        raise KekError(f"{where}: a key-encryption key is {KEK_BYTES} bytes, raw or in base64 "
                       f"(make one with: head -c {KEK_BYTES} /dev/urandom | base64)")
    return key


@functools.lru_cache(maxsize=8)
def _from_file(path: str, _stamp: tuple[int, int]) -> Kek:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KekError(f"keys.kek_file: cannot read the key-encryption key {path} ({exc.strerror or exc})") from None
    return Kek(_parse(data, f"keys.kek_file {path}"), path)


def load_kek(settings: Settings | None = None, *, path: Path | str | None = None,
             environ: Mapping[str, str] | None = None) -> Kek:
    """This node's KEK: ``MSSGW_KEK`` when set, else the file (``path``, or ``keys.kek_file``)."""
    env = os.environ if environ is None else environ
    raw = env.get(KEK_ENV, "").strip()
    if raw:
        return Kek(_parse(raw.encode("ascii", "replace"), KEK_ENV), KEK_ENV)
    if path is None:
        if settings is None:
            raise KekError("no key-encryption key: set MSSGW_KEK or keys.kek_file")
        path = kek_path(settings)
    target = Path(path)
    try:
        st = target.stat()
    except OSError:
        raise KekError(f"no key-encryption key: {target} is missing and {KEK_ENV} is not set; "
                       f"{_GIVE_SAME} ('mssgw init' makes one on the first node)") from None
    if st.st_mode & 0o077:  # as ssh does with a private key: a KEK others can read is no secret
        raise KekError(f"the key-encryption key {target} can be read by other users (mode "
                       f"{st.st_mode & 0o777:o}): chmod 600 {target}")
    return _from_file(str(target), (st.st_mtime_ns, st.st_size))


def create_kek_file(path: Path) -> bool:
    """Write 32 random bytes to ``path`` (0600) unless it exists; True when it was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(KEK_BYTES))
        out.flush()
        os.fsync(out.fileno())
    return True


def sealed_ref(name: str) -> str:
    """The ``Certificate.key_path`` naming sealed secret ``name``."""
    return SEALED_PREFIX + name


def sealed_name(key_path: str | None) -> str | None:
    """The sealed secret's name when ``key_path`` names one, else None (a file, or no key)."""
    if key_path and key_path.startswith(SEALED_PREFIX):
        return key_path[len(SEALED_PREFIX):]
    return None


def _seal(kek: Kek, name: str, clear: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(kek.key).encrypt(nonce, clear, name.encode("utf-8"))


def _mismatch(kek: Kek, sealed_with: str) -> KekError:
    return KekError(f"this node's key-encryption key (id {kek.id}) is not the one the keys were sealed with "
                    f"(id {sealed_with}): {_GIVE_SAME}")


def check_kek(session: Session, kek: Kek) -> None:
    """Refuse a KEK other than the one the rows are sealed with (a node given the wrong one)."""
    other = session.scalar(select(SealedSecret.kek_id).where(SealedSecret.kek_id != kek.id).limit(1))
    if other is not None:
        raise _mismatch(kek, other)


def open_sealed(kek: Kek, name: str, kek_id: str, nonce: bytes, ciphertext: bytes) -> bytes:
    """The clear bytes of one sealed value; the KEK is checked by id first, for a clear answer."""
    if kek_id != kek.id:
        raise _mismatch(kek, kek_id)
    try:
        return AESGCM(kek.key).decrypt(nonce, ciphertext, name.encode("utf-8"))
    except InvalidTag:
        raise SealedSecretError(f"sealed secret {name} does not open: the row was altered or copied "
                                "from another name") from None


def put(session: Session, kek: Kek, name: str, clear: bytes) -> None:
    """Seal ``clear`` as ``name`` (replacing a row of that name), in the caller's transaction.

    Refused under a KEK other than the rows' own: the other nodes could not open it."""
    check_kek(session, kek)
    nonce, ciphertext = _seal(kek, name, clear)
    row = session.get(SealedSecret, name)
    if row is None:
        session.add(SealedSecret(name=name, kek_id=kek.id, nonce=nonce, ciphertext=ciphertext))
    else:
        row.kek_id, row.nonce, row.ciphertext = kek.id, nonce, ciphertext
    session.flush()


def sealed_row(session: Session, name: str) -> tuple[str, bytes, bytes] | None:
    """(kek id, nonce, ciphertext) of ``name``: what a worker process opens with its own KEK."""
    row = session.get(SealedSecret, name)
    return None if row is None else (row.kek_id, bytes(row.nonce), bytes(row.ciphertext))


def read(session: Session, kek: Kek, name: str) -> bytes | None:
    """The clear value of ``name``, or None when no such row exists."""
    found = sealed_row(session, name)
    return None if found is None else open_sealed(kek, name, *found)


def exists(session: Session, name: str) -> bool:
    return session.scalar(select(func.count()).select_from(SealedSecret).where(SealedSecret.name == name)) == 1


def names(session: Session, prefix: str = "") -> list[str]:
    stmt = select(SealedSecret.name).order_by(SealedSecret.name)
    if prefix:
        stmt = stmt.where(SealedSecret.name.startswith(prefix, autoescape=True))
    return list(session.scalars(stmt))


@dataclass(frozen=True)
class SealedEntry:
    """One sealed row as an administrator sees it: its name, its KEK and whether it opens here."""

    name: str
    kek_id: str
    state: str  # "opens", "other-kek" (sealed under a KEK this node lacks) or "altered"


def inventory(session: Session, kek: Kek) -> list[SealedEntry]:
    """Every sealed row, each tried with ``kek`` (values are opened and dropped, never returned)."""
    entries = []
    for row in session.scalars(select(SealedSecret).order_by(SealedSecret.name)):
        if row.kek_id != kek.id:
            state = "other-kek"
        else:
            try:
                open_sealed(kek, row.name, row.kek_id, bytes(row.nonce), bytes(row.ciphertext))
                state = "opens"
            except SealedSecretError:
                state = "altered"
        entries.append(SealedEntry(row.name, row.kek_id, state))
    return entries


def check_some_open(entries: list[SealedEntry], kek: Kek, consequence: str = "") -> None:
    """Refuse a KEK that opens none of ``entries`` (when there are some): it is not the database's."""
    if entries and not any(e.state == "opens" for e in entries):
        raise KekError(f"this node's key-encryption key (id {kek.id}) opens none of the sealed secrets, so it is "
                       f"not this database's{consequence}; {_GIVE_SAME}")


class SecretNotDropped(SealedSecretError):
    """``drop_unopenable`` refused: no such row, or a row in use (exit status 1: refused)."""

    exit_code = 1


def drop_unopenable(session: Session, kek: Kek, name: str) -> SealedEntry:
    """Delete ``name`` if ``kek`` cannot open it (sealed under another KEK, or altered); returns it.

    Why: one row under a KEK no node has blocks every new seal and every rotation (``check_kek``),
    and its value is lost anyway.  A row that opens is refused: it is a key in use.  And ``kek``
    must be the database's own, proven by opening at least one other row: a node given a wrong
    KEK (a typo, another operator's) sees every row as ``other-kek`` and would drop keys in use."""
    entries = inventory(session, kek)
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        raise SecretNotDropped(f"no sealed secret {name} in the database")
    if entry.state == "opens":
        raise SecretNotDropped(f"sealed secret {name} opens with this node's key-encryption key: it is in use "
                               "and is not dropped (revoke its certificate or key instead)")
    check_some_open(entries, kek, ": nothing is dropped")
    row = session.get(SealedSecret, name)
    session.delete(row)
    session.flush()
    return entry


def rotate(session: Session, old: Kek, new: Kek) -> int:
    """Re-seal every row from ``old`` to ``new`` in the caller's one transaction; returns how many.

    Every row is opened before any is written back, so a row that does not open under ``old``
    stops the rotation with nothing changed (the caller rolls back)."""
    rows = list(session.scalars(select(SealedSecret).order_by(SealedSecret.name).with_for_update()))
    clear: dict[str, bytes] = {}
    for row in rows:
        clear[row.name] = open_sealed(old, row.name, row.kek_id, bytes(row.nonce), bytes(row.ciphertext))
    for row in rows:
        row.nonce, row.ciphertext = _seal(new, row.name, clear[row.name])
        row.kek_id = new.id
    session.flush()
    return len(rows)


# --- private keys of certificates ----------------------------------------------------------------

def key_name(fingerprint: str) -> str:
    """The sealed name of a certificate's private key."""
    return f"key:{fingerprint}"


def seal_private_key(session: Session, kek: Kek, fingerprint: str, key: PrivateKeyTypes) -> str:
    """Seal a certificate's private key (PKCS#8 DER); returns the ``Certificate.key_path`` naming it."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    name = key_name(fingerprint)
    put(session, kek, name, der)
    return sealed_ref(name)


def load_private_key(session: Session, kek: Kek | None, key_path: str) -> PrivateKeyTypes:
    """The private key ``key_path`` names: a sealed row (opened with ``kek``) or, for homes made
    before the keys moved into the database, a PEM file.  Errors name the key's place, never its bytes."""
    name = sealed_name(key_path)
    try:
        if name is None:
            return private_key_from_pem(Path(key_path).read_bytes())
        if kek is None:
            raise KekError(f"no key-encryption key to open {name}")
        der = read(session, kek, name)
        if der is None:
            raise SealedSecretError(f"no sealed secret {name} in the database")
        return private_key_from_der(der)
    except (OSError, ValueError, TypeError) as exc:  # the text could quote key material: class only
        raise SealedSecretError(f"cannot read private key {name or key_path}: {exc.__class__.__name__}") from None


def operator_key(session: Session, settings: Settings, kek: Kek | None = None) -> PrivateKeyTypes | None:
    """The private key of our operator certificate (``tls.operator_cert``) when it is sealed in the
    database; None when ``tls.operator_key`` names a file (the operator's explicit choice) or the
    key was never sealed (a home made before migration 0009): the caller then reads the file."""
    if settings.tls.operator_key:
        return None
    cert_path = settings.path("tls", "operator_cert", settings.pki_dir / "operator.pem")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    name = key_name(cert.fingerprint(hashes.SHA256()).hex())
    found = sealed_row(session, name)
    if found is None:
        return None
    der = open_sealed(kek or load_kek(settings), name, *found)
    try:
        return private_key_from_der(der)
    except (ValueError, TypeError) as exc:
        raise SealedSecretError(f"cannot read private key {name}: {exc.__class__.__name__}") from None


def ensure_kek(session: Session, settings: Settings) -> tuple[Kek, bool]:
    """This node's KEK, made at ``keys.kek_file`` when there is none *and* the database holds no
    sealed secret yet (a first node); (KEK, whether it was made now).

    A node joining a database whose secrets another KEK sealed gets the clear ``KekError``
    instead of a KEK of its own, which would seal new keys the other nodes cannot open."""
    try:
        kek = load_kek(settings)
        check_kek(session, kek)
        return kek, False
    except KekError:
        path = kek_path(settings)
        if os.environ.get(KEK_ENV, "").strip() or path.exists():
            raise  # given, but malformed, unreadable or not the rows' KEK: the operator must fix it
        held = session.scalar(select(func.count()).select_from(SealedSecret)) or 0
        if held:
            raise KekError(f"no key-encryption key at {path} (nor {KEK_ENV}) and the database already holds "
                           f"{held} sealed secret(s): {_GIVE_SAME}") from None
    made = create_kek_file(path)
    return load_kek(settings), made


# --- what a running node needs at start --------------------------------------------------------------

SALT_NAME = "pseudonym-salt"


def pseudonym_salt(factory: sessionmaker[Session], settings: Settings, legacy: Path) -> bytes:
    """The operator's patient-pseudonym salt, the same on every node: sealed in the database.

    Made on first use (32 random bytes), or taken from the file of an older home (``legacy``,
    removed once sealed) so pseudonyms already in the audit trail keep their value.  Two nodes
    starting at once on a fresh database: the second one's insert fails and it reads the first's."""
    from directory.db import transaction

    for attempt in range(2):
        try:
            with transaction(factory) as session:
                kek, _made = ensure_kek(session, settings)
                value = read(session, kek, SALT_NAME)
                if value is not None:
                    return value
                try:
                    old = legacy.read_bytes()
                except OSError:
                    old = b""
                value = old if len(old) >= 16 else os.urandom(32)
                if len(old) < 16:  # mssgw init makes it: a salt missing now was lost (its row deleted)
                    log.warning("the pseudonym salt is missing from the database (mssgw init made one: was its "
                                "row deleted?): a new one was made, so patient pseudonyms in logs and audit "
                                "records start afresh; restore the old row from a backup and restart every node")
                put(session, kek, SALT_NAME, value)
        except IntegrityError:
            if attempt:
                raise
            continue
        legacy.unlink(missing_ok=True)
        return value
    raise AssertionError("unreachable")  # pragma: no cover


def operator_key_pem(factory: sessionmaker[Session], settings: Settings) -> bytes | None:
    """``operator_key`` as PEM for OpenSSL (mutual TLS), or None when it is not sealed here."""
    with factory() as session:
        key = operator_key(session, settings)
    if key is None:
        return None
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip
