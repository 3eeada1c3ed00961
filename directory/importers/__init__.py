"""Loading the national directory into ours, and writing it back out.

Three inputs, each recognised by its first line (``import_file``):

- ``mss``: the MSSanté mailbox extract ``Extraction_Correspondance_MSSante_*.txt``
  (UTF-8, ``|``-separated, one header line, 31 columns): mailboxes, with their
  practitioner (PER) or organisation (ORG, APP); see ``directory.importers.annuaire``.
- ``rpps``: the RPPS extract ``PS_LibreAcces_Personne_activite_*.txt`` (52 columns,
  trailing ``|``, one line per activity): practitioners only.
- ``whitelist``: the MSSanté whitelist XML (``https://listeblanche.mssante.fr/schema``):
  trusted operator domains and their certificate identity; see
  ``directory.importers.whitelist``.

``export_directory`` writes mailboxes as JSON lines or in the ``mss`` format
(which ``import_file`` reads back); see ``directory.importers.export``.

Every import returns an ``ImportReport``: how many data lines were read, how many
rows were created, updated or left unchanged, and each bad line that was skipped
(1-based line number in the file, reason). Errors that stop a whole import (an
unknown header, a DTD in the XML, a database failure) raise
``directory.admin.DirectoryError`` with a sentence for a person; batches
committed before the failure stay, and a re-run completes the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.orm import Session, sessionmaker


@dataclass
class ImportReport:
    """What one import did."""

    kind: str  # "mss" (MSSanté mailbox extract), "rpps" (PS_LibreAcces), "whitelist"
    lines: int = 0  # data lines read (the header and blank lines are not counted)
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number in the file, reason)
    seconds: float = 0.0
    #: Side effects on other tables: practitioners / organisations / domains created or updated.
    details: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lines": self.lines,
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "skipped": [{"line": line, "reason": reason} for line, reason in self.skipped],
            "seconds": round(self.seconds, 3),
            "details": dict(self.details),
        }

    def summary(self) -> str:
        what = {"mss": "mailboxes", "rpps": "practitioners", "whitelist": "domains"}.get(self.kind, "rows")
        extra = ", ".join(f"{k} {v}" for k, v in self.details.items() if v)
        rate = f", {self.lines / self.seconds:,.0f} lines/s" if self.seconds > 0.5 else ""
        return (
            f"{self.kind}: {self.lines} lines read in {self.seconds:.1f} s{rate}: {what} "
            f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged; "
            f"{len(self.skipped)} bad lines skipped" + (f" ({extra})" if extra else "")
        )


def import_file(
    factory: sessionmaker[Session],
    path: Path,
    *,
    local_domains: Sequence[str],
    progress: bool = False,
    batch_size: int = 5000,
) -> ImportReport:
    """Import a national directory file; its kind is read from its first line."""
    from directory.importers.annuaire import detect_kind, import_annuaire

    kind = detect_kind(Path(path))
    if kind == "whitelist":
        return import_whitelist(factory, path, local_domains=local_domains)
    return import_annuaire(
        factory, Path(path), kind, local_domains=local_domains, progress=progress, batch_size=batch_size
    )


def import_whitelist(factory: sessionmaker[Session], path: Path, *, local_domains: Sequence[str]) -> ImportReport:
    """Load the MSSanté whitelist XML: every listed domain becomes trusted with its operator's DN."""
    from directory.importers.whitelist import load_whitelist

    return load_whitelist(factory, Path(path), local_domains=local_domains)


def export_directory(session: Session, out: TextIO, *, fmt: str = "json", local_only: bool = False) -> int:
    """Write mailboxes to ``out`` as JSON lines (``json``) or as the MSSanté extract (``mss``)."""
    from directory.importers.export import write_export

    return write_export(session, out, fmt=fmt, local_only=local_only)


__all__ = ["ImportReport", "export_directory", "import_file", "import_whitelist"]
