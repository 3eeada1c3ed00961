"""Import of the MSSanté whitelist: the operator domains of the trust space and their certificate identity.

Format: XML in the namespace ``https://listeblanche.mssante.fr/schema``, a
``ListeBlanche`` root holding ``Domaine`` elements, each with ``Nom`` (the mail
domain), ``DNCertificatOperateur`` (the subject DN of the operator's certificate,
which peers present in mutual TLS) and ``Description``; other children
(contacts, dates) are ignored.

Each listed domain becomes (or stays) TRUSTED through
``directory.admin.trust_domain(..., source="whitelist")``: its operator DN and
description are set, and a relay an admin configured is kept. One of our own
domains, a domain the operator blocked, an invalid name or a ``Domaine`` without
``Nom`` is skipped with its line number and the reason. All domains are written
in one transaction (the list holds hundreds, not millions).

The file is parsed as a stream with the standard library's expat parser (the one
under ``xml.etree``), which gives each element's line number. The same care as
``defusedxml``: a document type declaration or an entity declaration anywhere
refuses the whole file (no DTD, no entity expansion, no external resource is ever
fetched). Errors that stop the import (unreadable file, not well-formed XML, a
DTD or entity, wrong root element) raise ``directory.admin.DirectoryError``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from directory.admin import trust_domain
from directory.consumer import matches
from directory.identifiers import InvalidIdentifier, normalise_domain
from directory.importers import ImportReport
from directory.models import Domain, DomainKind
from gateway.core.errors import DirectoryError

NAMESPACE = "https://listeblanche.mssante.fr/schema"
ROOT = "ListeBlanche"
#: Limits on untrusted input: the real list is well under a megabyte.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_TEXT_CHARS = 4096
_CHUNK = 64 * 1024
_FIELDS = {"Nom", "DNCertificatOperateur", "Description"}


@dataclass
class WhitelistEntry:
    line: int
    name: str = ""
    operator_dn: str = ""
    description: str = ""


class _Refused(Exception):
    """Control flow inside the expat callbacks (a DTD or entity): turned into a WhitelistError."""


@dataclass
class _Collector:
    """Expat callbacks building ``WhitelistEntry`` values; refuses DTDs and entities."""

    parser: Any
    entries: list[WhitelistEntry] = field(default_factory=list)
    depth: int = 0
    root_seen: bool = False
    current: WhitelistEntry | None = None
    field_name: str | None = None
    text: list[str] = field(default_factory=list)

    def start(self, tag: str, _attrs: dict[str, str]) -> None:
        ns, _, local = tag.rpartition(" ")
        self.depth += 1
        if self.depth == 1:
            if local != ROOT or ns != NAMESPACE:
                raise _Refused(f"root element is {local!r} in namespace {ns or 'none'}, expected {ROOT} in {NAMESPACE}")
            self.root_seen = True
        elif self.depth == 2 and local == "Domaine" and ns == NAMESPACE:
            self.current = WhitelistEntry(line=self.parser.CurrentLineNumber)
        elif self.depth == 3 and self.current is not None and local in _FIELDS and ns == NAMESPACE:
            self.field_name = local
            self.text = []

    def end(self, tag: str) -> None:
        local = tag.rpartition(" ")[2]
        if self.depth == 3 and self.field_name is not None and self.current is not None:
            value = " ".join("".join(self.text).split())
            attr = {"Nom": "name", "DNCertificatOperateur": "operator_dn", "Description": "description"}
            setattr(self.current, attr[self.field_name], value)
            self.field_name = None
        elif self.depth == 2 and local == "Domaine" and self.current is not None:
            self.entries.append(self.current)
            self.current = None
        self.depth -= 1

    def chars(self, data: str) -> None:
        if self.field_name is not None:
            self.text.append(data)
            if sum(map(len, self.text)) > MAX_TEXT_CHARS:
                raise _Refused(f"<{self.field_name}> longer than {MAX_TEXT_CHARS} characters "
                               f"(line {self.parser.CurrentLineNumber})")

    def doctype(self, *_args: Any) -> None:
        raise _Refused("it declares a DTD (<!DOCTYPE>): refused, the whitelist never needs one")

    def entity(self, *_args: Any) -> None:
        raise _Refused("it declares an entity (<!ENTITY>): refused")

    def external(self, *_args: Any) -> int:
        raise _Refused("it references an external entity: refused")


def parse_whitelist(path: Path) -> list[WhitelistEntry]:
    """The ``Domaine`` entries of a whitelist file, in order, with their line numbers."""
    parser = expat.ParserCreate(namespace_separator=" ")
    collector = _Collector(parser)
    parser.StartElementHandler = collector.start
    parser.EndElementHandler = collector.end
    parser.CharacterDataHandler = collector.chars
    parser.StartDoctypeDeclHandler = collector.doctype
    parser.EntityDeclHandler = collector.entity
    parser.UnparsedEntityDeclHandler = collector.entity
    parser.ExternalEntityRefHandler = collector.external
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    total = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if total > MAX_FILE_BYTES:
                    raise _Refused(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
                parser.Parse(chunk, False)
            parser.Parse(b"", True)
    except OSError as exc:
        raise DirectoryError(f"cannot read {path}: {exc.strerror or exc}") from None
    except _Refused as exc:
        raise DirectoryError(f"{path.name}: not a usable MSSanté whitelist: {exc}") from None
    except expat.ExpatError as exc:
        raise DirectoryError(f"{path.name}: not well-formed XML: {expat.ErrorString(exc.code)} "
                             f"(line {exc.lineno}, column {exc.offset + 1})") from None
    if not collector.root_seen:
        raise DirectoryError(f"{path.name}: empty document, expected a {ROOT} element")
    return collector.entries


def _apply(session: Session, entries: list[WhitelistEntry], local: set[str], report: ImportReport) -> None:
    rows = {row.name: row for row in session.query(Domain)}
    blocked = [(row.name, row.reason) for row in rows.values() if row.kind == DomainKind.BLOCKED]
    for entry in entries:
        if not entry.name:
            report.skipped.append((entry.line, "Domaine without <Nom>"))
            continue
        try:
            name = normalise_domain(entry.name)
        except InvalidIdentifier as exc:
            report.skipped.append((entry.line, str(exc)))
            continue
        row = rows.get(name)
        if name in local or (row is not None and row.kind == DomainKind.LOCAL):
            report.skipped.append((entry.line, f"{name} is one of our own domains"))
            continue
        hit = next(((p, r) for p, r in blocked if matches(p, name)), None)
        if hit is not None and (row is None or row.kind == DomainKind.BLOCKED):
            report.skipped.append((entry.line, f"{name} is blocked by the operator ({hit[0]}): {hit[1]}; "
                                               "remove the block first to trust it"))
            continue
        before = None if row is None else (row.kind, row.operator_dn, row.description, row.source)
        updated = trust_domain(session, name, operator_dn=entry.operator_dn or None,
                               description=entry.description or None, source="whitelist")
        rows[name] = updated
        after = (updated.kind, updated.operator_dn, updated.description, updated.source)
        if before is None:
            report.created += 1
        elif before == after:
            report.unchanged += 1
        else:
            report.updated += 1


def load_whitelist(factory: sessionmaker[Session], path: Path, *, local_domains: Sequence[str]) -> ImportReport:
    started = time.perf_counter()
    entries = parse_whitelist(path)
    report = ImportReport(kind="whitelist", lines=len(entries))
    try:
        with factory() as session, session.begin():
            _apply(session, entries, {d.lower() for d in local_domains}, report)
    except SQLAlchemyError as exc:
        raise DirectoryError(f"database error while loading the whitelist ({type(exc).__name__}); "
                             "nothing was changed") from exc
    report.skipped.sort()
    report.seconds = time.perf_counter() - started
    return report


__all__ = ["WhitelistEntry", "load_whitelist", "parse_whitelist"]
