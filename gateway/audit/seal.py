"""Seals: signed checkpoints of the audit trail, kept outside the database.

The hash chain alone proves nothing to someone who owns the database: the last
records can be deleted, or a record edited and every later hash recomputed, and
the chain still verifies. A seal fixes the trail's head at one moment: the head's
sequence number, hash and timestamp, the first sequence number and the number of
records, signed with the operator's private key: the one sealed in the database for the
operator certificate (``directory.secrets.operator_key``), so every node signs with the key
peers know; a file only when ``tls.operator_key`` names one explicitly.  A ``pki/operator.key``
lying in the home is never used: it may not be this operator's key (RSA-PSS or ECDSA with SHA-256). Seals are appended, one JSON
line each, to ``HOME/audit/seals.jsonl`` (folder 0700, file 0600, fsynced, under
an exclusive ``flock`` so the gateway and ``mssgw audit seal`` never interleave).
Each line carries the SHA-256 of the line before it (``prev``), so a seal removed
from the middle or reordered is seen; the signer's certificate is copied once to
``audit/signers/<sha256>.pem`` so seals made before a certificate renewal still
verify.

The running gateway seals through ``AuditWriter`` (``Sealer.run``): when
``every_records`` records were added or ``every_seconds`` passed with new ones, and
once more at clean shutdown. Reading the head is one indexed query every
``poll`` seconds; nothing is sealed when nothing changed.

Several nodes sharing one PostgreSQL each append to a chain of their own
(``gateway.audit.trail``) and each seals its own chain in its own home; a seal also
names the head of every other chain it sees (``chains``), so a chain cut back while
its node is down is caught by any other node's seals (``sealcheck``).

What a seal cannot see: records added after the last seal (reported as the
unsealed tail) and seal lines cut from the end of the file by someone who can
write the operator's home.

Errors: ``SealError`` (no readable key or certificate, the seal file cannot be
written); the message names the file, never key material.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from sqlalchemy import Engine, bindparam, func, select
from sqlalchemy.orm import Session, sessionmaker

from directory.db import read_session_factory
from directory.secrets import operator_key
from gateway.audit.models import AuditRecord
from gateway.audit.trail import check_chain, read_only
from gateway.audit.watch import watch_for
from gateway.core.durable import fsync_dir, write_durably
from gateway.core.errors import MssgwError
from gateway.core.keys import private_key_from_pem

log = logging.getLogger("mssgw.audit")

SEAL_VERSION = 1
GENESIS = "0" * 64
EVERY_RECORDS = 1000
EVERY_SECONDS = 60.0
POLL_SECONDS = 5.0
_TAIL_READ = 64 * 1024  # a seal line is well under 1 KiB: the last one is in the file's last 64 KiB


class SealError(MssgwError):
    """Sealing is impossible: key, certificate or seal file; the message names the file."""


def seals_path(home: Path) -> Path:
    return home / "audit" / "seals.jsonl"


def ts_text(ts: datetime) -> str:
    if ts.tzinfo is None:  # SQLite returns naive datetimes: they are UTC
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def canonical(fields: dict[str, Any]) -> bytes:
    """The signed bytes: the seal's fields but ``sig``, sorted, compact."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def line_digest(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def sign(key: Any, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise SealError("the operator key is neither RSA nor EC")


def signature_holds(cert: x509.Certificate, data: bytes, sig: bytes) -> bool:
    public = cert.public_key()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(sig, data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Head:
    """The trail as a seal records it."""

    head_seq: int
    head_hash: str
    head_ts: str
    first_seq: int
    count: int


_LAST = (select(AuditRecord.seq, AuditRecord.hash, AuditRecord.ts)
         .where(AuditRecord.node == bindparam("node", type_=AuditRecord.node.type))
         .order_by(AuditRecord.seq.desc()).limit(1))  # fmt: skip
_HEADS = select(AuditRecord.node, func.max(AuditRecord.seq)).group_by(AuditRecord.node)


def other_heads(session: Session, node: str) -> dict[str, list[Any]]:
    """[seq, hash] of the head of every chain but ``node``'s: what a seal vouches for across nodes."""
    out: dict[str, list[Any]] = {}
    for name, seq in session.execute(_HEADS).all():
        if name == node or seq is None:
            continue
        digest = session.scalar(select(AuditRecord.hash).where(AuditRecord.node == name, AuditRecord.seq == seq))
        out[str(name)] = [int(seq), str(digest)]
    return out


def read_head(session: Session, hint: dict[str, Any] | None = None, node: str = "") -> Head | None:
    """The trail's head and size. ``hint`` (the previous seal) turns the count into a count of the
    records added since, when nothing was purged in between: a full ``count(*)`` of a large table
    every minute would cost more than all the sealing."""
    last = session.execute(_LAST, {"node": node}).first()
    if last is None:
        return None
    seq = int(last[0])
    first = int(session.scalar(select(func.min(AuditRecord.seq)).where(AuditRecord.node == node)) or seq)
    since, base = 0, 0
    try:
        if hint is not None and int(hint["first_seq"]) == first and 0 < int(hint["head_seq"]) <= seq:
            since, base = int(hint["head_seq"]), int(hint["count"])
    except (KeyError, TypeError, ValueError):
        since, base = 0, 0
    added = session.scalar(select(func.count()).select_from(AuditRecord)
                           .where(AuditRecord.node == node, AuditRecord.seq > since, AuditRecord.seq <= seq))  # fmt: skip
    return Head(seq, str(last[1]), ts_text(last[2]), first, base + int(added or 0))


def _last_line(fd: int) -> str | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - _TAIL_READ)
    data = os.pread(fd, size - start, start)
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    return lines[-1].decode("utf-8", "surrogateescape") if lines else None


def _private_dir(path: Path) -> None:
    created = not path.exists()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if created:
        fsync_dir(path.parent)


class Sealer:
    """Appends signed seals of the trail's head to the seal file; thread-safe, one process or several."""

    def __init__(self, factory: sessionmaker[Session], path: Path, cert_path: Path, key_path: Path | None, *,
                 every_records: int = EVERY_RECORDS, every_seconds: float = EVERY_SECONDS,
                 poll: float = POLL_SECONDS, settings: Any = None) -> None:
        bind = factory.kw.get("bind")
        # Reads only: on SQLite a read-only session never waits for (nor holds) the write lock.
        self._reader = read_session_factory(bind) if isinstance(bind, Engine) else factory
        self._factory = factory
        self._readback = read_only(bind) if isinstance(bind, Engine) else None
        self.path = path
        self._cert_path = cert_path
        self._key_path = key_path
        self._settings = settings  # given, with no key_path: the sealed operator key is read from the database
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.poll = poll
        self._lock = threading.Lock()
        self._signer: tuple[Any, x509.Certificate, str] | None = None
        self._sealed_seq = -1  # head of the last seal this process made or read
        self._sealed_at = 0.0

    @classmethod
    def for_settings(cls, settings: Any, factory: sessionmaker[Session], **kwargs: Any) -> Sealer:
        pki = settings.pki_dir
        explicit = settings.path("tls", "operator_key", pki / "operator.key") if settings.tls.operator_key else None
        return cls(factory, seals_path(settings.home),
                   settings.path("tls", "operator_cert", pki / "operator.pem"),
                   explicit, settings=settings, **kwargs)  # fmt: skip

    def _load_signer(self) -> tuple[Any, x509.Certificate, str]:
        if self._signer is None:
            try:
                cert = x509.load_pem_x509_certificate(self._cert_path.read_bytes())
            except (OSError, ValueError) as exc:
                raise SealError(f"cannot read the operator certificate {self._cert_path}: "
                                f"{type(exc).__name__}") from None  # fmt: skip
            key: Any = None
            if self._key_path is None:
                if self._settings is None:
                    raise SealError("no operator key: give the settings (sealed key) or a key file")
                try:
                    with self._reader() as session:
                        key = operator_key(session, self._settings)
                except MssgwError as exc:  # no KEK, another node's KEK: its sentence, never key material
                    raise SealError(f"cannot open the operator key sealed in the database: {exc}") from None
                if key is None:
                    raise SealError(f"the operator certificate {self._cert_path} has no key sealed in the database: "
                                    "it is not this operator's certificate (run 'mssgw init' to write it from the "
                                    "database), or an older home's key is still a file ('mssgw certs seal-keys')")
            else:
                try:
                    key = private_key_from_pem(self._key_path.read_bytes())
                except (OSError, ValueError, TypeError) as exc:  # the text could quote key material: class only
                    raise SealError(f"cannot read the operator key {self._key_path}: {type(exc).__name__}") from None
            self._signer = (key, cert, fingerprint(cert))
        return self._signer

    def _keep_signer_cert(self, cert: x509.Certificate, fp: str) -> None:
        """Seals name their signer by fingerprint; its certificate stays next to them after a renewal."""
        folder = self.path.parent / "signers"
        target = folder / f"{fp}.pem"
        if target.exists():
            return
        _private_dir(folder)
        tmp = folder / f".{fp}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        write_durably(tmp, target, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)

    @property
    def node(self) -> str:
        """The chain this process appends to, which its seals cover (``trail.bind_node``)."""
        bind = self._factory.kw.get("bind")
        return watch_for(bind).node if isinstance(bind, Engine) else ""

    def due(self, head_seq: int) -> bool:
        if head_seq <= self._sealed_seq:
            return False
        return (head_seq - self._sealed_seq >= self.every_records
                or time.monotonic() - self._sealed_at >= self.every_seconds)  # fmt: skip

    def seal(self, *, force: bool = True) -> dict[str, Any] | None:
        """Seal the current head; returns the seal written, None when the head was already sealed
        (or, with ``force=False``, when no seal is due yet) or the trail is empty."""
        key, cert, fp = self._load_signer()
        with self._lock:
            # Never a clean seal over a gap: this process's own last record must still be there
            # (else a break record is written first), and breaks it saw are named in the seal.
            check_chain(self._factory, self._readback)
            watch = watch_for(self._factory.kw["bind"]) if isinstance(self._factory.kw.get("bind"), Engine) else None
            breaks = watch.take_breaks() if watch is not None else []
            made: dict[str, Any] | None = None
            try:
                made = self._seal_locked(key, cert, fp, force=force or bool(breaks), breaks=breaks)
                return made
            finally:
                if watch is not None and breaks and made is None:  # not sealed: the next seal names them
                    watch.give_back(breaks)

    def _seal_locked(self, key: Any, cert: x509.Certificate, fp: str, *, force: bool,
                     breaks: list[dict[str, Any]]) -> dict[str, Any] | None:
        node = self.node
        with self._reader() as session:
            probe = session.execute(_LAST, {"node": node}).first()
        if probe is None or (not force and not self.due(int(probe[0]))):
            return None
        _private_dir(self.path.parent)
        self._keep_signer_cert(cert, fp)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process (mssgw audit seal) may be sealing
            os.fchmod(fd, 0o600)
            last = _last_line(fd)
            previous: dict[str, Any] | None = None
            if last is not None:
                with contextlib.suppress(ValueError):
                    loaded = json.loads(last)
                    previous = loaded if isinstance(loaded, dict) else None
            with self._reader() as session:
                head = read_head(session, previous, node)
                others = other_heads(session, node)
            if head is None:
                return None
            if (previous and previous.get("head_seq") == head.head_seq
                    and previous.get("head_hash") == head.head_hash and not breaks):
                self._sealed_seq, self._sealed_at = head.head_seq, time.monotonic()
                return None
            fields: dict[str, Any] = {
                "v": SEAL_VERSION, "sealed_at": ts_text(datetime.now(UTC)),
                "head_seq": head.head_seq, "head_hash": head.head_hash, "head_ts": head.head_ts,
                "first_seq": head.first_seq, "count": head.count,
                "signer": fp, "prev": line_digest(last) if last is not None else GENESIS,
            }  # fmt: skip
            if node:
                fields["node"] = node
            if others:  # the other nodes' chains, as this node sees them now
                fields["chains"] = others
            if breaks:  # what this process found deleted or changed since its previous seal
                fields["breaks"] = breaks
            fields["sig"] = base64.b64encode(sign(key, canonical(fields))).decode("ascii")
            line = json.dumps(fields, sort_keys=True, separators=(",", ":")) + "\n"
            os.write(fd, line.encode("ascii"))
            os.fsync(fd)
            if created:  # the new file's name must survive a crash too
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise SealError(f"cannot write the seal file {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)  # also releases the flock
        self._sealed_seq, self._sealed_at = head.head_seq, time.monotonic()
        return fields

    async def run(self, executor: Any = None) -> None:
        """Seal periodically (the writer's companion task); a failure is logged and tried again."""
        loop = asyncio.get_running_loop()
        self._sealed_at = time.monotonic()
        failures = 0
        while True:
            try:
                await loop.run_in_executor(executor, lambda: self.seal(force=False))
                failures = 0
            except Exception as exc:  # database, key or file unavailable: the next poll tries again
                if failures % 60 == 0:  # once, then every 60 polls: an alert, not a flood
                    log.error("audit seal failed error=%s detail=%s", type(exc).__name__,
                              exc if isinstance(exc, SealError) else "-")
                failures += 1
            await asyncio.sleep(self.poll)


def read_seals(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-empty line of the seal file."""
    try:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, 1):
                text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                if text.strip():
                    yield number, text
    except FileNotFoundError:
        return
