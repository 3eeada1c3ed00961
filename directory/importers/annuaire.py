"""Streaming import of the national directory's extracts: MSSanté mailboxes and RPPS practitioners.

Formats (both UTF-8, ``|``-separated, one header line, read line by line):

- ``mss``, ``Extraction_Correspondance_MSSante_*.txt``, 31 columns: Type de BAL
  (PER, ORG, APP), Adresse BAL, Type Identifiant PP (``8`` RPPS, ``0`` ADELI),
  Identifiant PP, Identification nationale PP, structure id type (``1`` FINESS,
  ``2`` SIREN, ``3`` SIRET, ``4`` RPPS-RANG) and id, Service de rattachement,
  civility, names, profession and savoir-faire codes and labels, Raison Sociale and
  address of the structure. A PER line upserts the practitioner (RPPS Luhn-checked)
  and the mailbox; every line with a structure id upserts that organisation and
  attaches the mailbox to it.
- ``rpps``, ``PS_LibreAcces_Personne_activite_*.txt``, 52 columns and a trailing
  ``|``, one line per activity: upserts practitioners (one row per identifier).

Rules:

- Mailboxes of a domain in ``local_domains`` (or already LOCAL) are ours
  (``local=True``); the others are known remote addresses. A remote domain not in
  the domains table yet is added as TRUSTED with source ``annuaire`` and no relay
  nor operator identity: the national directory only lists operators of the trust
  space, and until the whitelist import fills the operator DN (or an admin adds a
  relay or a certificate) the recipient rules refuse mail for it as unprotectable.
- Never a mailbox in a blocked domain (consumer providers, admin blocks): the line
  is skipped with the reason. The import never deletes nor deactivates anything:
  an admin's deactivation, password and delegations survive re-imports.
- Idempotent upserts keyed on the address (mailboxes), the identifier
  (practitioners) and (type, identifier) (organisations). Lines are parsed and
  checked first, then applied per batch of ``batch_size`` lines in one transaction:
  a batch is all or nothing, and re-running after a crash completes the rest with
  no duplicates. Per batch there is one SELECT per table for the batch's keys, then
  bulk INSERT (``ON CONFLICT DO NOTHING``, so a concurrent writer cannot make the
  batch fail; ``RETURNING`` the new ids; on PostgreSQL through ``COPY`` into a
  temporary table) and executemany UPDATEs of the rows that changed.

Errors: a bad line (wrong column count, invalid address, RPPS failing its check
digit, undecodable bytes, a field too long for its column, a blocked domain) is
reported as ``(line number, reason)`` and skipped. An unknown header raises
``DirectoryError``; so does a database failure, naming the lines of the batch that
was rolled back.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, Table, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from directory.consumer import matches
from directory.identifiers import InvalidIdentifier, check_practitioner_id, luhn_valid, normalise_address
from directory.importers import ImportReport
from directory.models import Domain, DomainKind, Mailbox, MailboxType, Organisation, Practitioner
from gateway.core.errors import DirectoryError

MSS_COLUMNS = 31
RPPS_COLUMNS = 52
MSS_HEADER_START = ("Type de BAL", "Adresse BAL")
RPPS_HEADER_START = ("Type d'identifiant PP", "Identifiant PP")
#: A line longer than this is refused without being read into memory whole.
MAX_LINE_BYTES = 64 * 1024
#: The progress bar is moved once per this many bytes read.
BAR_STEP_BYTES = 256 * 1024
#: Read buffer of the extract.
READ_BUFFER_BYTES = 1024 * 1024
#: "Type identifiant structure" codes of the extract.
STRUCTURE_ID_TYPES = {"1": "FINESS", "2": "SIREN", "3": "SIRET", "4": "RPPS-RANG"}
STRUCTURE_ID_CODES = {v: k for k, v in STRUCTURE_ID_TYPES.items()}

_MAILBOXES: Table = Mailbox.__table__  # type: ignore[assignment]
_PRACTITIONERS: Table = Practitioner.__table__  # type: ignore[assignment]
_ORGANISATIONS: Table = Organisation.__table__  # type: ignore[assignment]
_DOMAINS: Table = Domain.__table__  # type: ignore[assignment]


def _limit(table: Table, column: str) -> int:
    return int(getattr(table.c[column].type, "length", None) or 10_000)


# --- reading ---------------------------------------------------------------------------


def _header(path: Path) -> str:
    with path.open("rb") as f:
        raw = f.readline(MAX_LINE_BYTES)
    return raw.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")


def detect_kind(path: Path) -> str:
    """``mss``, ``rpps`` or ``whitelist`` from the file's first line, else ``DirectoryError``."""
    try:
        header = _header(path)
    except OSError as exc:
        raise DirectoryError(f"cannot read {path}: {exc.strerror or exc}") from None
    cols = header.split("|")
    if tuple(cols[:2]) == MSS_HEADER_START:
        if len(cols) != MSS_COLUMNS:
            raise DirectoryError(f"{path.name}: MSSanté extract header has {len(cols)} columns, expected {MSS_COLUMNS}")
        return "mss"
    if tuple(cols[:2]) == RPPS_HEADER_START:
        if len(cols) not in (RPPS_COLUMNS, RPPS_COLUMNS + 1):
            raise DirectoryError(f"{path.name}: RPPS extract header has {len(cols)} columns, expected {RPPS_COLUMNS}")
        return "rpps"
    if header.startswith("<?xml") or header.startswith("<ListeBlanche"):
        return "whitelist"
    shown = header[:60] + ("..." if len(header) > 60 else "")
    raise DirectoryError(
        f"{path.name}: unknown file kind (first line {shown!r}); expected the MSSanté mailbox extract "
        "('Type de BAL|Adresse BAL|...'), the RPPS extract (\"Type d'identifiant PP|Identifiant PP|...\") "
        "or the MSSanté whitelist XML"
    )


def _lines(f: IO[bytes], bar: Any) -> Iterator[tuple[int, str | None, str]]:
    """``(line number, text, "")`` per data line, or ``(line number, None, reason)`` when unreadable."""
    number = 1
    unshown = len(f.readline(MAX_LINE_BYTES))  # the header, checked by detect_kind
    readline = f.readline
    while True:
        raw = readline(MAX_LINE_BYTES)
        if not raw:
            bar.update(unshown)
            return
        number += 1
        unshown += len(raw)
        if unshown >= BAR_STEP_BYTES:  # the bar moves per step, not per line
            bar.update(unshown)
            unshown = 0
        if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # drop the rest of the oversized line
                raw = readline(MAX_LINE_BYTES)
                unshown += len(raw)
            yield number, None, f"line longer than {MAX_LINE_BYTES} bytes"
            continue
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            yield number, None, f"not UTF-8 (byte {exc.start + 1})"
            continue
        if text.strip():
            yield number, text, ""


class _NoBar:
    def update(self, _n: int) -> None:
        return None

    def close(self) -> None:
        return None


def _progress_bar(path: Path, progress: bool) -> Any:
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name, file=sys.stderr,
                leave=False)


# --- parsed lines ----------------------------------------------------------------------


@dataclass(slots=True)
class Person:
    """A practitioner as a line gives it."""

    id_type: str
    identifier: str
    civility: str | None
    last_name: str
    first_name: str
    profession_code: str | None
    profession_label: str | None
    specialty_code: str | None
    specialty_label: str | None


@dataclass(slots=True)
class Box:
    """A mailbox line of the MSSanté extract."""

    line: int
    address: str
    domain: str
    type: MailboxType
    person: Person | None
    org: tuple[str, str, str] | None  # (id type, identifier, name)
    service: str | None
    display_name: str | None


_PERSON_LIMITS = {
    name: _limit(_PRACTITIONERS, name)
    for name in ("civility", "last_name", "first_name", "profession_code", "profession_label", "specialty_code",
                 "specialty_label")
}
_CIV_MAX, _LAST_MAX, _FIRST_MAX, _PCODE_MAX, _PLABEL_MAX, _SCODE_MAX, _SLABEL_MAX = _PERSON_LIMITS.values()

def _check_person(person: Person) -> Person:
    if not person.last_name:
        raise InvalidIdentifier(f"practitioner {person.identifier} has no last name")
    p = person
    if (len(p.last_name) > _LAST_MAX or len(p.first_name) > _FIRST_MAX
            or (p.civility is not None and len(p.civility) > _CIV_MAX)
            or (p.profession_code is not None and len(p.profession_code) > _PCODE_MAX)
            or (p.profession_label is not None and len(p.profession_label) > _PLABEL_MAX)
            or (p.specialty_code is not None and len(p.specialty_code) > _SCODE_MAX)
            or (p.specialty_label is not None and len(p.specialty_label) > _SLABEL_MAX)):
        for name, limit in _PERSON_LIMITS.items():  # which one, in column order
            value = getattr(person, name)
            if value and len(value) > limit:
                raise InvalidIdentifier(f"{name.replace('_', ' ')} longer than {limit} characters")
    return person


def _person(id_type: str, identifier: str, national: str, civility: str, last: str, first: str,
            prof_code: str, prof_label: str, sf_code: str, sf_label: str) -> Person:
    ident = identifier.strip()
    if not ident:
        raise InvalidIdentifier("no practitioner identifier")
    id_type = id_type.strip() or "8"
    # The common case, an 11-digit RPPS, checked here as ``check_practitioner_id`` would;
    # anything else (ADELI, the 12-digit national form, a bad check digit) goes through it.
    if id_type == "8" and len(ident) == 11 and ident.isdigit() and ident.isascii() and luhn_valid(ident):
        kind = "RPPS"
    else:
        kind, ident = check_practitioner_id(id_type, identifier)
    national = national.strip()
    if national and national != ("8" if kind == "RPPS" else "0") + ident:
        raise InvalidIdentifier(f"national identifier {national} does not match {kind} {ident}")
    return _check_person(Person(kind, ident, civility.strip() or None, last.strip(), first.strip(),
                                prof_code.strip() or None, prof_label.strip() or None, sf_code.strip() or None,
                                sf_label.strip() or None))


_BOX_LIMITS = {name: _limit(_MAILBOXES, name) for name in ("display_name", "service")}
_ORG_LIMITS = {name: _limit(_ORGANISATIONS, name) for name in ("id_type", "identifier", "name")}
_MAILBOX_TYPES = {t.value: t for t in MailboxType}


def parse_mss_line(number: int, text: str) -> Box:
    """One line of the MSSanté extract, checked; ``InvalidIdentifier`` says what is wrong."""
    cols = text.split("|")
    if len(cols) != MSS_COLUMNS:
        raise InvalidIdentifier(f"expected {MSS_COLUMNS} columns, found {len(cols)}")
    mtype = _MAILBOX_TYPES.get(cols[0].strip().upper())
    if mtype is None:
        raise InvalidIdentifier(f"unknown mailbox type {cols[0]!r} (PER, ORG or APP)")
    address = normalise_address(cols[1])
    person = None
    if mtype is MailboxType.PER:
        person = _person(cols[2], cols[3], cols[4], cols[8], cols[9], cols[10], cols[13], cols[14], cols[15],
                         cols[16])
    org = None
    raison = cols[18].strip()
    org_id = cols[6].strip()
    if org_id:
        org_code = cols[5].strip()
        org = (STRUCTURE_ID_TYPES.get(org_code, org_code or "FINESS"), org_id, raison)
        for (name, limit), value in zip(_ORG_LIMITS.items(), org, strict=True):
            if len(value) > limit:
                raise InvalidIdentifier(f"structure {name.replace('_', ' ')} longer than {limit} characters")
    service = cols[7].strip() or None
    if person is not None:
        display = f"{person.first_name} {person.last_name}".strip()
    else:
        display = f"{raison} ({service})" if raison and service else (raison or service or "")
    for name, value in (("display_name", display), ("service", service or "")):
        if value and len(value) > _BOX_LIMITS[name]:
            raise InvalidIdentifier(f"{name.replace('_', ' ')} longer than {_BOX_LIMITS[name]} characters")
    return Box(number, address, address.rpartition("@")[2], mtype, person, org, service, display or None)


def parse_rpps_line(text: str) -> Person:
    """One activity line of the RPPS extract (52 columns and a trailing ``|``)."""
    cols = text.split("|")
    if len(cols) == RPPS_COLUMNS + 1 and cols[-1] == "":
        cols.pop()
    if len(cols) != RPPS_COLUMNS:
        raise InvalidIdentifier(f"expected {RPPS_COLUMNS} columns, found {len(cols)}")
    civility = cols[3] or cols[5]  # civilité d'exercice (DR, PR), else civilité (M, MME)
    return _person(cols[0], cols[1], cols[2], civility, cols[7], cols[8], cols[9], cols[10], cols[15], cols[16])


# --- writing ---------------------------------------------------------------------------


class Bulk:
    """Batched statements straight on the batch's connection: the import's hot path.

    The SQL is plain and portable (``INSERT ... ON CONFLICT DO NOTHING RETURNING``
    exists in SQLite >= 3.35 and PostgreSQL), built from the models' table and column
    names. Rows are tuples in database form: enums by name (as SQLAlchemy's ``Enum``
    stores them), the one timestamp of the import pre-processed once by the column
    type; this skips SQLAlchemy's per-row parameter processing, which costs more than
    the database itself at this volume. Inserts are multi-row ``VALUES`` lists that
    return the new rows' ids, so no second lookup; lookups by key are ``IN`` lists
    (SQLite) or one ``= ANY(array)`` (PostgreSQL).
    """

    #: Keys per ``IN (...)`` list, well under SQLite's and PostgreSQL's parameter limits.
    IN_CHUNK = 1000
    #: Parameters per multi-row INSERT (SQLite allows 32,766): a few hundred rows, so
    #: the prepared statements SQLite's module keeps stay small.
    MAX_PARAMS = 4000

    def __init__(self, session: Session, now: datetime) -> None:
        self.conn = session.connection()
        dialect = self.conn.dialect
        self.ph = "?" if dialect.paramstyle in ("qmark", "numeric") else "%s"
        self.arrays = dialect.name == "postgresql"
        column_type = _MAILBOXES.c.updated_at.type
        processor = column_type.dialect_impl(dialect).bind_processor(dialect)
        self.now = processor(now) if processor else now

    def select_in(self, table: Table, columns: Sequence[str], key: str, keys: Iterable[Any],
                  also: tuple[str, Iterable[Any]] | None = None) -> list[Any]:
        """Rows of ``columns`` whose ``key`` is one of ``keys`` (and ``also[0]`` one of ``also[1]``)."""
        keys = list(keys)
        if not keys:
            return []
        head = f"SELECT {', '.join(columns)} FROM {table.name} WHERE "
        if self.arrays:
            sql = head + f"{key} = ANY(%s)" + (f" AND {also[0]} = ANY(%s)" if also else "")
            params = (keys, list(also[1])) if also else (keys,)
            return list(self.conn.exec_driver_sql(sql, params).fetchall())
        fixed: list[Any] = list(also[1]) if also else []
        extra = f" AND {also[0]} IN ({', '.join([self.ph] * len(fixed))})" if also else ""
        rows: list[Any] = []
        for i in range(0, len(keys), self.IN_CHUNK):
            chunk = keys[i:i + self.IN_CHUNK]
            sql = head + f"{key} IN ({', '.join([self.ph] * len(chunk))}){extra}"
            rows.extend(self.conn.exec_driver_sql(sql, (*chunk, *fixed)).fetchall())
        return rows

    def insert(self, table: Table, names: Sequence[str], rows: Sequence[tuple[Any, ...]],
               returning: Sequence[str] = ()) -> list[Any]:
        """Insert ``rows`` (tuples of ``names``), leaving any row a concurrent writer added first.

        Returns the ``returning`` columns of the rows inserted (in no particular order).
        """
        if not rows:
            return []
        tail = " ON CONFLICT DO NOTHING" + (f" RETURNING {', '.join(returning)}" if returning else "")
        if self.arrays:
            return self._copy_insert(table, names, rows, tail)
        one = f"({', '.join([self.ph] * len(names))})"
        head = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES "
        per = max(1, self.MAX_PARAMS // len(names))
        out: list[Any] = []
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            result = self.conn.exec_driver_sql(head + ", ".join([one] * len(chunk)) + tail,
                                               tuple(chain.from_iterable(chunk)))
            if returning:
                out.extend(result.fetchall())
        return out

    def _copy_insert(self, table: Table, names: Sequence[str], rows: Sequence[tuple[Any, ...]],
                     tail: str) -> list[Any]:
        """PostgreSQL: ``COPY`` the rows into a temporary table, then one ``INSERT ... SELECT`` from it.

        The temporary table (the columns of ``names``, no constraints) lives as long as the
        connection and is emptied at each commit or rollback's end of transaction.
        """
        columns = ", ".join(names)
        scratch = f"mssgw_import_{table.name}"
        self.conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {scratch} ON COMMIT DELETE ROWS AS "
            f"SELECT {columns} FROM {table.name} WITH NO DATA")
        self.conn.exec_driver_sql(f"DELETE FROM {scratch}")  # left by an earlier insert of this transaction
        raw = self.conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cursor, cursor.copy(f"COPY {scratch} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        result = self.conn.exec_driver_sql(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {scratch}{tail}")
        return list(result.fetchall()) if " RETURNING " in tail else []

    def update(self, table: Table, names: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        """``UPDATE ... SET names WHERE id = ...`` for each row (tuples of ``names`` then the id)."""
        if not rows:
            return
        sql = f"UPDATE {table.name} SET {', '.join(f'{n} = {self.ph}' for n in names)} WHERE id = {self.ph}"
        self.conn.exec_driver_sql(sql, list(rows))


#: Columns written for a practitioner, in the order of the value tuples below.
_PERSON_NAMES = ("identifier", "id_type", "last_name", "first_name", "active", "civility", "profession_code",
                 "profession_label", "specialty_code", "specialty_label")


class _Counter:
    def __init__(self) -> None:
        self.created = self.updated = self.unchanged = 0


def upsert_practitioners(bulk: Bulk, people: Iterable[Person], counter: _Counter) -> dict[str, int]:
    """Upsert the practitioners (in order; a later line for the same identifier wins). Returns identifier -> id.

    An empty optional field (civility, profession, specialty) keeps what the row had.
    """
    people = list(people)
    t = _PRACTITIONERS
    # identifier -> (id, values as stored); values are in _PERSON_NAMES order
    known: dict[str, tuple[int | None, tuple[Any, ...]]] = {
        row[1]: (row[0], tuple(row[1:]))
        for row in bulk.select_in(t, ("id", *_PERSON_NAMES), "identifier", {p.identifier for p in people})
    }
    ids = {ident: pid for ident, (pid, _) in known.items() if pid is not None}
    pending: dict[str, tuple[int | None, tuple[Any, ...]]] = {}  # identifier -> (id or None, values to write)
    for p in people:
        ident = p.identifier
        prior = pending.get(ident) or known.get(ident)
        if prior is None:
            values: tuple[Any, ...] = (ident, p.id_type, p.last_name, p.first_name, True, p.civility,
                                       p.profession_code, p.profession_label, p.specialty_code, p.specialty_label)
            counter.created += 1
        else:
            base = prior[1]
            values = (ident, p.id_type, p.last_name, p.first_name, True, p.civility or base[5],
                      p.profession_code or base[6], p.profession_label or base[7], p.specialty_code or base[8],
                      p.specialty_label or base[9])
            if values == base:
                counter.unchanged += 1
                continue
            counter.updated += 1
        pending[ident] = (prior[0] if prior else None, values)
    now = bulk.now
    new = [(*values, now) for pid, values in pending.values() if pid is None]
    for pid, ident in bulk.insert(t, (*_PERSON_NAMES, "updated_at"), new, returning=("id", "identifier")):
        ids[ident] = pid
    bulk.update(t, (*_PERSON_NAMES[1:], "updated_at"),
                [(*values[1:], now, pid) for pid, values in pending.values() if pid is not None])
    missing = [values[0] for pid, values in pending.values() if pid is None and values[0] not in ids]
    if missing:  # inserted meanwhile by a concurrent writer: ours was left out
        ids.update((ident, pid) for ident, pid in bulk.select_in(t, ("identifier", "id"), "identifier", missing))
    return ids


def upsert_organisations(bulk: Bulk, orgs: Iterable[tuple[str, str, str]],
                         counter: _Counter) -> dict[tuple[str, str], int]:
    """Upsert organisations keyed on (id type, identifier); a non-empty name replaces the stored one."""
    names: dict[tuple[str, str], str] = {}
    for id_type, ident, name in orgs:
        if name or (id_type, ident) not in names:
            names[(id_type, ident)] = name
    if not names:
        return {}
    t = _ORGANISATIONS
    types = {id_type for id_type, _ in names}
    ids: dict[tuple[str, str], int] = {}
    changed = []
    now = bulk.now
    # Both columns constrained, so the (id_type, identifier) unique index serves the lookup.
    for oid, id_type, ident, name in bulk.select_in(t, ("id", "id_type", "identifier", "name"), "identifier",
                                                    {i for _, i in names}, also=("id_type", types)):
        key = (id_type, ident)
        if key in names:
            ids[key] = oid
            if names[key] and names[key] != name:
                changed.append((names[key], now, oid))
    new = [(k[0], k[1], n, True, now) for k, n in names.items() if k not in ids]
    for oid, id_type, ident in bulk.insert(t, ("id_type", "identifier", "name", "active", "updated_at"), new,
                                           returning=("id", "id_type", "identifier")):
        ids[(id_type, ident)] = oid
    bulk.update(t, ("name", "updated_at"), changed)
    missing = [row for row in new if (row[0], row[1]) not in ids]
    if missing:  # inserted meanwhile by a concurrent writer: ours was left out
        for oid, id_type, ident in bulk.select_in(t, ("id", "id_type", "identifier"), "identifier",
                                                  {r[1] for r in missing}, also=("id_type", {r[0] for r in missing})):
            ids.setdefault((id_type, ident), oid)
    counter.created += len(new)
    counter.updated += len(changed)
    return ids


class _Domains:
    """What the import knows about mail domains: loaded once, extended as batches commit."""

    def __init__(self, session: Session, local_domains: Sequence[str]) -> None:
        self.kinds: dict[str, tuple[DomainKind, str | None]] = {}
        for name in local_domains:
            row = session.get(Domain, name.lower())
            if row is None or row.kind != DomainKind.LOCAL:
                from directory.admin import add_local_domain

                add_local_domain(session, name)
        for name, kind, reason in session.execute(select(Domain.name, Domain.kind, Domain.reason)):
            self.kinds[name] = (kind, reason)
        self.blocked = [(n, r or "blocked") for n, (k, r) in self.kinds.items() if k == DomainKind.BLOCKED]
        # domain -> refusal; blocks do not change during an import, and a domain the
        # import adds is a trusted one, which no block named.
        self._refusals: dict[str, str | None] = {}

    def refusal(self, domain: str) -> str | None:
        """Why no mailbox may be created in ``domain``, or ``None`` when it may."""
        if domain in self._refusals:
            return self._refusals[domain]
        known = self.kinds.get(domain)
        refusal = None
        if known is not None:
            kind, reason = known
            refusal = f"domain {domain} is blocked: {reason}" if kind == DomainKind.BLOCKED else None
        else:
            for pattern, reason in self.blocked:
                if matches(pattern, domain):
                    refusal = f"domain {domain} is blocked ({pattern}): {reason}"
                    break
        self._refusals[domain] = refusal
        return refusal

    def is_local(self, domain: str) -> bool:
        return self.kinds.get(domain, (DomainKind.TRUSTED, None))[0] == DomainKind.LOCAL


#: Columns written for a mailbox, in the order of the value tuples below.
_BOX_NAMES = ("address", "type", "domain", "local", "display_name", "practitioner_id", "organisation_id", "service")


def apply_mss_batch(session: Session, boxes: list[Box], domains: _Domains, report: ImportReport,
                    now: datetime) -> list[str]:
    """Write one batch of checked mailbox lines; returns the domains it added to the trust list."""
    bulk = Bulk(session, now)
    usable: list[Box] = []
    new_domains: list[str] = []
    for box in boxes:
        refusal = domains.refusal(box.domain)
        if refusal is not None:
            report.skipped.append((box.line, refusal))
            continue
        if box.domain not in domains.kinds and box.domain not in new_domains:
            new_domains.append(box.domain)
        usable.append(box)
    bulk.insert(_DOMAINS, ("name", "kind", "source", "use_mx", "prefers_openpgp", "updated_at"),
                [(d, DomainKind.TRUSTED.name, "annuaire", False, False, bulk.now) for d in new_domains])
    people, orgs = _Counter(), _Counter()
    person_ids = upsert_practitioners(bulk, (b.person for b in usable if b.person), people)
    org_ids = upsert_organisations(bulk, (b.org for b in usable if b.org), orgs)
    for key, value in (("practitioners created", people.created), ("practitioners updated", people.updated),
                       ("organisations created", orgs.created), ("organisations updated", orgs.updated),
                       ("domains added", len(new_domains))):
        report.details[key] = report.details.get(key, 0) + value

    # address -> (id, values as stored); values are in _BOX_NAMES order
    known: dict[str, tuple[int | None, tuple[Any, ...]]] = {
        row[1]: (row[0], tuple(row[1:]))
        for row in bulk.select_in(_MAILBOXES, ("id", *_BOX_NAMES), "address", {b.address for b in usable})
    }
    local = {d: domains.is_local(d) for d in {b.domain for b in usable}}
    pending: dict[str, tuple[int | None, tuple[Any, ...]]] = {}
    created = updated = unchanged = 0
    for box in usable:
        address = box.address
        prior = pending.get(address) or known.get(address)
        practitioner_id = person_ids[box.person.identifier] if box.person else None
        organisation_id = org_ids[box.org[:2]] if box.org else None
        if prior is None:
            values: tuple[Any, ...] = (address, box.type.name, box.domain, local[box.domain], box.display_name,
                                       practitioner_id, organisation_id, box.service)
            created += 1
        else:
            base = prior[1]
            values = (address, box.type.name, box.domain, local[box.domain], box.display_name or base[4],
                      practitioner_id if box.person else base[5], organisation_id if box.org else base[6],
                      box.service or base[7])
            if values == base:
                unchanged += 1
                continue
            updated += 1
        pending[address] = (prior[0] if prior else None, values)
    report.created += created
    report.updated += updated
    report.unchanged += unchanged
    now_db = bulk.now
    bulk.insert(_MAILBOXES, (*_BOX_NAMES, "active", "source", "updated_at"),
                [(*values, True, "annuaire", now_db) for pid, values in pending.values() if pid is None])
    bulk.update(_MAILBOXES, (*_BOX_NAMES[1:], "updated_at"),
                [(*values[1:], now_db, pid) for pid, values in pending.values() if pid is not None])
    return new_domains


# --- the import ------------------------------------------------------------------------


#: SQLite page cache of the import's connection (KiB): the indexes of a national
#: directory do not fit SQLite's default 2 MB, and misses cost more than the inserts.
SQLITE_IMPORT_CACHE_KIB = 64 * 1024


@contextmanager
def _import_sessions(factory: sessionmaker[Session]) -> Iterator[sessionmaker[Session]]:
    """Sessions for the import's batches: on SQLite, all on one connection with a larger page cache."""
    engine = factory.kw.get("bind")
    if not isinstance(engine, Engine) or engine.dialect.name != "sqlite":
        yield factory
        return
    with engine.connect() as conn:
        # Checkpoint once at the end rather than every ~1000 pages: the batches rewrite the same
        # index pages again and again, and each automatic checkpoint copied them all to the
        # database file. And no fsync per batch: an import is idempotent and resumable, and WAL
        # with synchronous=NORMAL still survives a crash of the process (a power cut may lose
        # the last batches, which a re-run restores). Queue commits keep synchronous=FULL on
        # their own connections. Set on the driver's connection: SQLite refuses these in a transaction.
        raw = conn.connection.driver_connection
        raw.execute("PRAGMA wal_autocheckpoint = 0")  # type: ignore[union-attr]
        raw.execute("PRAGMA synchronous = NORMAL")  # type: ignore[union-attr]
        conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_IMPORT_CACHE_KIB}")
        conn.commit()
        try:
            yield sessionmaker(bind=conn, expire_on_commit=False)
        finally:
            conn.rollback()
            conn.exec_driver_sql("PRAGMA cache_size = -2000")  # SQLite's default, for the pooled connection
            conn.commit()
            raw.execute("PRAGMA synchronous = FULL")  # type: ignore[union-attr]
            raw.execute("PRAGMA wal_autocheckpoint = 1000")  # type: ignore[union-attr]
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]


def _commit_batch(factory: sessionmaker[Session], first_line: int, last_line: int, work: Any) -> Any:
    try:
        with factory() as session, session.begin():
            return work(session)
    except SQLAlchemyError as exc:
        raise DirectoryError(
            f"database error in the batch of lines {first_line}-{last_line} ({type(exc).__name__}); "
            "that batch was rolled back, the batches before it are saved: fix the cause and run the import again"
        ) from exc


def import_annuaire(
    factory: sessionmaker[Session],
    path: Path,
    kind: str,
    *,
    local_domains: Sequence[str],
    progress: bool = False,
    batch_size: int = 5000,
) -> ImportReport:
    """Stream an ``mss`` or ``rpps`` extract into the directory (see the module docstring)."""
    if kind not in ("mss", "rpps"):
        raise DirectoryError(f"unknown extract kind {kind!r}")
    if batch_size < 1:
        raise DirectoryError("the batch size must be at least 1")
    started = time.perf_counter()
    report = ImportReport(kind=kind)
    now = datetime.now(UTC)
    domains: _Domains | None = None
    if kind == "mss":
        domains = _commit_batch(factory, 1, 1, lambda s: _Domains(s, [d.lower() for d in local_domains]))

    batch: list[Any] = []
    first = 0
    sessions = factory  # replaced by the import's own sessions below

    def flush(last: int) -> None:
        if not batch:
            return
        if kind == "mss":
            assert domains is not None
            added = _commit_batch(sessions, first, last,
                                  lambda s: apply_mss_batch(s, batch, domains, report, now))
            for name in added:
                domains.kinds[name] = (DomainKind.TRUSTED, None)
        else:
            counter = _Counter()
            _commit_batch(sessions, first, last, lambda s: upsert_practitioners(Bulk(s, now), batch, counter))
            report.created += counter.created
            report.updated += counter.updated
            report.unchanged += counter.unchanged
        batch.clear()

    bar = _progress_bar(path, progress)
    number = 1
    try:
        with _import_sessions(factory) as sessions, path.open("rb", buffering=READ_BUFFER_BYTES) as f:
            for number, text, problem in _lines(f, bar):
                report.lines += 1
                if text is None:
                    report.skipped.append((number, problem))
                    continue
                try:
                    item = parse_mss_line(number, text) if kind == "mss" else parse_rpps_line(text)
                except InvalidIdentifier as exc:
                    report.skipped.append((number, str(exc)))
                    continue
                if not batch:
                    first = number
                batch.append(item)
                if len(batch) >= batch_size:
                    flush(number)
            flush(number)
    except OSError as exc:
        raise DirectoryError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        bar.close()
    report.skipped.sort()
    report.seconds = time.perf_counter() - started
    return report


__all__ = ["detect_kind", "import_annuaire", "parse_mss_line", "parse_rpps_line"]
