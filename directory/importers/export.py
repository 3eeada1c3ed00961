"""Writing the directory's mailboxes out: JSON lines, or the MSSanté extract format.

Formats:

- ``json``: one JSON object per line and per mailbox (address, type, local,
  active, display name, service, domain, source, practitioner identifier and
  names, organisation identifier and name). Never a password hash.
- ``mss``: the 31-column ``|``-separated extract with its header line, as the
  national directory publishes it; ``directory.importers.import_file`` reads it
  back and finds every mailbox unchanged. Columns the directory does not keep
  (profession category, addresses of the structure) are left empty.

Rows are streamed from the database in address order (``yield_per``), so memory
stays flat however large the directory. An unknown format raises
``directory.admin.DirectoryError``.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from directory.importers.annuaire import MSS_COLUMNS, STRUCTURE_ID_CODES
from directory.models import Mailbox, Organisation, Practitioner
from gateway.core.errors import DirectoryError

MSS_HEADER = (
    "Type de BAL|Adresse BAL|Type Identifiant PP|Identifiant PP|Identification nationale PP|"
    "Type identifiant structure|Identification Structure|Service de rattachement|Civilité d'exercice|"
    "Nom d'exercice|Prénom d'exercice|Catégorie profession|Libellé de catégorie profession|Code Profession|"
    "Libellé Profession|Code savoir-faire|Libellé savoir-faire|Dématérialisation|Raison Sociale structure BAL|"
    "Enseigne commerciale structure BAL|L2COMPLEMENTLOCALISATION structure BAL|"
    "L3COMPLEMENTDISTRIBUTION structure BAL|L4NUMEROVOIE structure BAL|L4COMPLEMENTNUMEROVOIE structure BAL|"
    "NL4TYPEVOIE structure BAL|L4LIBELLEVOIE structure BAL|L5LIEUDITMENTION structure BAL|"
    "L6LIGNEACHEMINEMENT structure BAL|Code postal structure BAL|Département structure BAL|Pays structure BAL"
)
FORMATS = ("json", "mss")


def _clean(value: str | None) -> str:
    """A field value that cannot break the ``|``-separated line."""
    return "" if value is None else value.replace("|", "/").replace("\r", " ").replace("\n", " ")


def _mss_line(row: Any) -> str:
    cols = [""] * MSS_COLUMNS
    cols[0] = row.type.value
    cols[1] = row.address
    if row.p_identifier:
        prefix = "8" if row.p_id_type == "RPPS" else "0"
        cols[2], cols[3], cols[4] = prefix, row.p_identifier, prefix + row.p_identifier
        cols[8], cols[9], cols[10] = _clean(row.civility), _clean(row.last_name), _clean(row.first_name)
        cols[13], cols[14] = _clean(row.profession_code), _clean(row.profession_label)
        cols[15], cols[16] = _clean(row.specialty_code), _clean(row.specialty_label)
    if row.o_identifier:
        cols[5] = STRUCTURE_ID_CODES.get(row.o_id_type, row.o_id_type)
        cols[6] = _clean(row.o_identifier)
        cols[18] = _clean(row.o_name)
    cols[7] = _clean(row.service)
    return "|".join(cols)


def _json_line(row: Any) -> str:
    data = {
        "address": row.address,
        "type": row.type.value,
        "local": row.local,
        "active": row.active,
        "display_name": row.display_name,
        "service": row.service,
        "domain": row.domain,
        "source": row.source,
        "practitioner": None if not row.p_identifier else {
            "id_type": row.p_id_type, "identifier": row.p_identifier, "last_name": row.last_name,
            "first_name": row.first_name, "civility": row.civility, "profession_code": row.profession_code,
            "profession_label": row.profession_label, "specialty_code": row.specialty_code,
            "specialty_label": row.specialty_label,
        },
        "organisation": None if not row.o_identifier else {
            "id_type": row.o_id_type, "identifier": row.o_identifier, "name": row.o_name,
        },
    }
    return json.dumps(data, ensure_ascii=False)


def write_export(session: Session, out: TextIO, *, fmt: str = "json", local_only: bool = False) -> int:
    """Write every mailbox (or only ours) to ``out``; returns how many."""
    if fmt not in FORMATS:
        raise DirectoryError(f"unknown export format {fmt!r} (json or mss)")
    m, p, o = Mailbox, Practitioner, Organisation
    query = (
        select(m.address, m.type, m.local, m.active, m.display_name, m.service, m.domain, m.source,
               p.id_type.label("p_id_type"), p.identifier.label("p_identifier"), p.civility, p.last_name,
               p.first_name, p.profession_code, p.profession_label, p.specialty_code, p.specialty_label,
               o.id_type.label("o_id_type"), o.identifier.label("o_identifier"), o.name.label("o_name"))
        .outerjoin(p, m.practitioner_id == p.id)
        .outerjoin(o, m.organisation_id == o.id)
        .order_by(m.address)
    )
    if local_only:
        query = query.where(m.local.is_(True))
    line = _mss_line if fmt == "mss" else _json_line
    if fmt == "mss":
        out.write(MSS_HEADER + "\n")
    count = 0
    for row in session.execute(query.execution_options(yield_per=2000)):
        out.write(line(row) + "\n")
        count += 1
    return count


__all__ = ["FORMATS", "MSS_HEADER", "write_export"]
