"""Importers of the national directory (MSSanté extract, RPPS, whitelist) and the export, on both databases."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from directory import admin, facts
from directory.db import transaction
from directory.identifiers import luhn_valid
from directory.importers import annuaire as annuaire_module
from directory.importers import export_directory, import_file, import_whitelist
from directory.importers.export import MSS_HEADER
from directory.models import Domain, DomainKind, Mailbox, Organisation, Practitioner
from gateway.core.errors import DirectoryError

ANNUAIRE = Path(__file__).resolve().parent.parent / "fixtures" / "annuaire"
MSS = ANNUAIRE / "Extraction_Correspondance_MSSante_202611200300.txt"
RPPS = ANNUAIRE / "PS_LibreAcces_Personne_activite_202611200300.txt"
WHITELIST = ANNUAIRE / "listeblanchemssante.xml"

#: The six malformed lines of the sample extract, found by hand.
BAD_LINES = {
    2: "RPPS 10355311150 fails its Luhn check digit",
    24: "expected 31 columns, found 16",
    108: "expected 31 columns, found 19",
    148: "not a valid mail address",
    152: "RPPS 10458628484 fails its Luhn check digit",
    155: "RPPS 10014712137 fails its Luhn check digit",
}


def rpps(body: str) -> str:
    """``body`` (10 digits) with its Luhn check digit: a valid RPPS."""
    for key in "0123456789":
        if luhn_valid(body + key):
            return body + key
    raise AssertionError("unreachable")


RPPS_A, RPPS_B, RPPS_C = rpps("1000000000"), rpps("1000000001"), rpps("1000000002")


def count(factory: sessionmaker[Session], model: type) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def mss_line(address: str, *, kind: str = "PER", rpps: str = "", last: str = "MARTIN",
             first: str = "Marie", structure: str = "123456789", raison: str = "CHU TEST", service_: str = "") -> str:
    cols = [""] * 31
    cols[0], cols[1] = kind, address
    if kind == "PER":
        rpps = rpps or RPPS_A
        cols[2], cols[3], cols[4] = "8", rpps, "8" + rpps
        cols[9], cols[10], cols[13], cols[14] = last, first, "10", "Médecin"
    if structure:
        cols[5], cols[6] = "1", structure
    cols[7], cols[18] = service_, raison
    return "|".join(cols)


def write_mss(tmp_path: Path, lines: list[str], name: str = "Extraction_Correspondance_MSSante_t.txt") -> Path:
    path = tmp_path / name
    path.write_text(MSS_HEADER + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_sample_extract_counts_and_bad_lines(factory: sessionmaker[Session]) -> None:
    report = import_file(factory, MSS, local_domains=["a.mssante.test"])
    assert report.kind == "mss"
    assert report.lines == 206
    assert (report.created, report.updated, report.unchanged) == (200, 0, 0)
    assert [line for line, _ in report.skipped] == sorted(BAD_LINES)
    for line, reason in report.skipped:
        assert BAD_LINES[line] in reason
    assert report.created + report.updated + report.unchanged + len(report.skipped) == report.lines
    assert count(factory, Mailbox) == 200
    # every PER line has its practitioner; the 26 ORG lines have none
    with factory() as session:
        per = session.scalar(select(func.count()).select_from(Mailbox).where(Mailbox.practitioner_id.is_not(None)))
    assert per == 174
    assert count(factory, Practitioner) == 174
    data = report.as_dict()
    assert json.loads(json.dumps(data))["skipped"][0] == {"line": 2, "reason": BAD_LINES[2]}
    assert "200 created" in report.summary() and "6 bad lines" in report.summary()


def test_rerun_is_idempotent(factory: sessionmaker[Session]) -> None:
    import_file(factory, MSS, local_domains=["a.mssante.test"])
    again = import_file(factory, MSS, local_domains=["a.mssante.test"])
    assert (again.created, again.updated, again.unchanged, len(again.skipped)) == (0, 0, 200, 6)
    assert count(factory, Mailbox) == 200
    assert count(factory, Practitioner) == 174


def test_mailbox_details_and_domains(factory: sessionmaker[Session]) -> None:
    import_file(factory, MSS, local_domains=["a.mssante.test", "hcl.mssante.fr"])
    with factory() as session:
        box = admin.get_mailbox(session, "noel.le-goff11@chu-rennes.mssante.fr")
        assert box.type.value == "PER" and not box.local and box.active and box.source == "annuaire"
        assert box.practitioner is not None and box.practitioner.identifier == "10018780170"
        assert box.practitioner.specialty_code == "SM53" and box.practitioner.last_name == "LE GOFF"
        assert box.display_name == "Noël LE GOFF"
        assert box.organisation is not None
        assert (box.organisation.id_type, box.organisation.identifier) == ("FINESS", "598983478")
        org_box = admin.get_mailbox(session, "secretariat.cardio21@pharmacien.mssante.fr")
        assert org_box.practitioner is None and org_box.service == "Urgences"
        assert org_box.organisation is not None and org_box.organisation.name == "CABINET MEDICAL DU PARC"
        assert org_box.display_name == "CABINET MEDICAL DU PARC (Urgences)"
        # our own domain: local mailboxes
        hcl = session.scalars(select(Mailbox).where(Mailbox.domain == "hcl.mssante.fr")).all()
        assert hcl and all(b.local for b in hcl)
        # remote domains were added to the trust list, without route nor operator identity yet
        dom = session.get(Domain, "chu-rennes.mssante.fr")
        assert dom is not None and dom.kind == DomainKind.TRUSTED and dom.source == "annuaire"
        assert dom.relay is None and dom.operator_dn is None
        local = session.get(Domain, "hcl.mssante.fr")
        assert local is not None and local.kind == DomainKind.LOCAL


def test_never_a_mailbox_in_a_blocked_domain(factory: sessionmaker[Session], tmp_path: Path) -> None:
    with transaction(factory) as session:
        admin.block_domain(session, "spam.example", reason="abuse")
    path = write_mss(tmp_path, [
        mss_line("someone@gmail.com"),
        mss_line("someone@yahoo.fr", rpps=RPPS_B),
        mss_line("x@mail.spam.example", kind="ORG"),
        mss_line("ok@medecin.mssante.fr", rpps=RPPS_C),
    ])
    report = import_file(factory, path, local_domains=["a.mssante.test"])
    assert report.created == 1
    assert [line for line, _ in report.skipped] == [2, 3, 4]
    assert "gmail.com is blocked" in report.skipped[0][1]
    assert "yahoo.*" in report.skipped[1][1]
    assert "abuse" in report.skipped[2][1]
    with factory() as session:
        assert session.get(Domain, "yahoo.fr") is None
        assert [b.address for b in session.scalars(select(Mailbox))] == ["ok@medecin.mssante.fr"]


def test_updates_keep_admin_decisions(factory: sessionmaker[Session], tmp_path: Path) -> None:
    first = write_mss(tmp_path, [mss_line("dr@medecin.mssante.fr", last="DUPONT")])
    import_file(factory, first, local_domains=["a.mssante.test"])
    with transaction(factory) as session:
        admin.set_active(session, "dr@medecin.mssante.fr", False)
        admin.trust_domain(session, "medecin.mssante.fr", relay="mx.medecin.test:25")
    second = write_mss(tmp_path, [mss_line("dr@medecin.mssante.fr", last="DUPONT-MARTIN")], name="b.txt")
    report = import_file(factory, second, local_domains=["a.mssante.test"])
    assert (report.created, report.updated, report.unchanged) == (0, 1, 0)
    with factory() as session:
        box = admin.get_mailbox(session, "dr@medecin.mssante.fr")
        assert not box.active  # the admin's deactivation survives
        assert box.practitioner is not None and box.practitioner.last_name == "DUPONT-MARTIN"
        assert box.display_name == "Marie DUPONT-MARTIN"
        dom = session.get(Domain, "medecin.mssante.fr")
        assert dom is not None and dom.relay == "mx.medecin.test:25"


def test_duplicate_lines_in_one_file(factory: sessionmaker[Session], tmp_path: Path) -> None:
    line = mss_line("dup@medecin.mssante.fr")
    path = write_mss(tmp_path, [line, line, mss_line("dup@medecin.mssante.fr", last="AUTRE")])
    report = import_file(factory, path, local_domains=["a.mssante.test"])
    assert (report.created, report.updated, report.unchanged) == (1, 1, 1)
    assert count(factory, Mailbox) == 1


def test_unreadable_and_oversized_lines_are_skipped(factory: sessionmaker[Session], tmp_path: Path) -> None:
    path = tmp_path / "Extraction_Correspondance_MSSante_x.txt"
    good = mss_line("ok@medecin.mssante.fr").encode()
    huge = b"PER|" + b"x" * (annuaire_module.MAX_LINE_BYTES + 10)
    path.write_bytes(MSS_HEADER.encode() + b"\n" + b"PER|caf\xe9@x.fr\n" + huge + b"\n\n" + good + b"\n")
    report = import_file(factory, path, local_domains=["a.mssante.test"])
    assert report.created == 1
    assert [line for line, _ in report.skipped] == [2, 3]
    assert "not UTF-8" in report.skipped[0][1] and "longer than" in report.skipped[1][1]


def test_batches_are_all_or_nothing_and_resumable(factory: sessionmaker[Session],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = annuaire_module.apply_mss_batch
    calls = {"n": 0}

    def crash_on_third(session, boxes, domains, report, now):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        result = real(session, boxes, domains, report, now)
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")  # after the batch wrote: it must be rolled back
        return result

    monkeypatch.setattr(annuaire_module, "apply_mss_batch", crash_on_third)
    with pytest.raises(RuntimeError):
        import_file(factory, MSS, local_domains=["a.mssante.test"], batch_size=50)
    assert count(factory, Mailbox) == 100  # two whole batches, nothing of the third
    monkeypatch.setattr(annuaire_module, "apply_mss_batch", real)
    report = import_file(factory, MSS, local_domains=["a.mssante.test"], batch_size=50)
    assert (report.created, report.unchanged) == (100, 100)
    assert count(factory, Mailbox) == 200


def test_database_error_names_the_batch(factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    def broken(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(annuaire_module, "apply_mss_batch", broken)
    with pytest.raises(DirectoryError, match=r"batch of lines 3-207 .*rolled back"):
        import_file(factory, MSS, local_domains=["a.mssante.test"])


def test_rpps_extract(factory: sessionmaker[Session]) -> None:
    report = import_file(factory, RPPS, local_domains=["a.mssante.test"])
    assert report.kind == "rpps" and report.lines == 100 and not report.skipped
    assert report.created + report.updated + report.unchanged == 100
    distinct = {line.split("|")[1] for line in RPPS.read_text(encoding="utf-8").splitlines()[1:]}
    assert count(factory, Practitioner) == len(distinct) == report.created  # one row per practitioner
    again = import_file(factory, RPPS, local_domains=["a.mssante.test"])
    assert (again.created, again.updated, again.unchanged) == (0, 0, 100)
    with factory() as session:
        row = session.scalar(select(Practitioner).where(Practitioner.identifier == "10181590836"))
        assert row is not None and (row.last_name, row.civility, row.specialty_code) == ("MOREAU", "DR", "SM54")


def test_unknown_header_is_refused(factory: sessionmaker[Session], tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("name;address\nx;y\n", encoding="utf-8")
    with pytest.raises(DirectoryError, match="unknown file kind"):
        import_file(factory, path, local_domains=["a.mssante.test"])
    short = tmp_path / "short.txt"
    short.write_text("Type de BAL|Adresse BAL|Autre\n", encoding="utf-8")
    with pytest.raises(DirectoryError, match="3 columns, expected 31"):
        import_file(factory, short, local_domains=["a.mssante.test"])


def test_progress_bar_goes_to_stderr(factory: sessionmaker[Session], capsys: pytest.CaptureFixture[str]) -> None:
    import_file(factory, MSS, local_domains=["a.mssante.test"], progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Extraction_Correspondance" in captured.err


# --- whitelist --------------------------------------------------------------------------


def test_whitelist(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:
        admin.trust_domain(session, "aphp.mssante.fr", relay="mx.aphp.test:25")
    report = import_whitelist(factory, WHITELIST, local_domains=["a.mssante.test"])
    assert report.kind == "whitelist" and report.lines == 12 and not report.skipped
    assert (report.created, report.updated) == (11, 1)
    with factory() as session:
        dom = session.get(Domain, "aphp.mssante.fr")
        assert dom is not None and dom.kind == DomainKind.TRUSTED and dom.source == "whitelist"
        assert dom.relay == "mx.aphp.test:25"  # the admin's route is kept
        assert dom.operator_dn == "CN=mx.aphp.mssante.fr,OU=49786907366258,O=Operateur aphp,ST=Paris (75),C=FR"
        assert dom.description == "Opérateur de aphp.mssante.fr"
    again = import_file(factory, WHITELIST, local_domains=["a.mssante.test"])  # detected from its header
    assert (again.kind, again.created, again.updated, again.unchanged) == ("whitelist", 0, 0, 12)


def test_whitelist_fills_the_operator_dn_of_annuaire_domains(factory: sessionmaker[Session]) -> None:
    import_file(factory, MSS, local_domains=["a.mssante.test"])
    import_whitelist(factory, WHITELIST, local_domains=["a.mssante.test"])
    with factory() as session:
        found = facts.recipient_facts(session, "noel.le-goff11@chu-rennes.mssante.fr")
    assert found.domain_kind == "trusted" and found.mailbox_known and found.operator_dn


def _whitelist(tmp_path: Path, body: str, prolog: str = "") -> Path:
    path = tmp_path / "wl.xml"
    path.write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n{prolog}'
        f'<ListeBlanche xmlns="https://listeblanche.mssante.fr/schema">\n{body}\n</ListeBlanche>\n',
        encoding="utf-8",
    )
    return path


def test_whitelist_skips_with_line_numbers(factory: sessionmaker[Session], tmp_path: Path) -> None:
    path = _whitelist(tmp_path, "\n".join([
        "<Domaine><Nom>ok.mssante.fr</Nom><DNCertificatOperateur>CN=ok</DNCertificatOperateur></Domaine>",
        "<Domaine><Nom>a.mssante.test</Nom></Domaine>",
        "<Domaine><Nom>gmail.com</Nom></Domaine>",
        "<Domaine><Description>no name</Description></Domaine>",
        "<Domaine><Nom>not a domain</Nom></Domaine>",
    ]))
    report = import_whitelist(factory, path, local_domains=["a.mssante.test"])
    assert report.created == 1
    assert [line for line, _ in report.skipped] == [4, 5, 6, 7]
    reasons = [r for _, r in report.skipped]
    assert "our own" in reasons[0] and "blocked" in reasons[1] and "without <Nom>" in reasons[2]
    assert "not a valid domain" in reasons[3]


@pytest.mark.parametrize(
    ("prolog", "body", "message"),
    [
        ('<!DOCTYPE ListeBlanche [<!ENTITY x "boom">]>\n', "<Domaine><Nom>&x;</Nom></Domaine>", "DTD"),
        ('<!DOCTYPE ListeBlanche SYSTEM "http://evil.test/x.dtd">\n', "", "DTD"),
        ("", "<Domaine><Nom>x</Nom>", "not well-formed"),
    ],
)
def test_whitelist_refuses_dtds_and_bad_xml(factory: sessionmaker[Session], tmp_path: Path, prolog: str,
                                           body: str, message: str) -> None:
    with pytest.raises(DirectoryError, match=message):
        import_whitelist(factory, _whitelist(tmp_path, body, prolog), local_domains=["a.mssante.test"])
    assert count(factory, Domain) == count(factory, Domain)  # nothing half-done: checked below
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Domain).where(Domain.source == "whitelist")) == 0


def test_whitelist_wrong_root(factory: sessionmaker[Session], tmp_path: Path) -> None:
    path = tmp_path / "other.xml"
    path.write_text('<?xml version="1.0"?><Liste><Domaine><Nom>x.fr</Nom></Domaine></Liste>', encoding="utf-8")
    with pytest.raises(DirectoryError, match="expected ListeBlanche"):
        import_whitelist(factory, path, local_domains=[])


# --- export -----------------------------------------------------------------------------


def test_export_mss_round_trip(factory: sessionmaker[Session], tmp_path: Path) -> None:
    import_file(factory, MSS, local_domains=["a.mssante.test", "hcl.mssante.fr"])
    out = io.StringIO()
    with factory() as session:
        assert export_directory(session, out, fmt="mss") == 200
    text = out.getvalue()
    assert text.splitlines()[0] == MSS.read_text(encoding="utf-8").splitlines()[0]
    assert all(len(line.split("|")) == 31 for line in text.splitlines())
    path = tmp_path / "Extraction_Correspondance_MSSante_export.txt"
    path.write_text(text, encoding="utf-8")
    report = import_file(factory, path, local_domains=["a.mssante.test", "hcl.mssante.fr"])
    assert (report.lines, report.created, report.updated, report.unchanged, report.skipped) == (200, 0, 0, 200, [])

    with factory() as session:
        local = io.StringIO()
        n_local = export_directory(session, local, fmt="json", local_only=True)
        everything = io.StringIO()
        export_directory(session, everything, fmt="json")
    rows = [json.loads(line) for line in local.getvalue().splitlines()]
    assert n_local == len(rows) > 0 and all(r["local"] and r["domain"] == "hcl.mssante.fr" for r in rows)
    assert "password" not in local.getvalue()
    all_rows = [json.loads(line) for line in everything.getvalue().splitlines()]
    assert len(all_rows) == 200 and all_rows == sorted(all_rows, key=lambda r: r["address"])
    per = next(r for r in all_rows if r["address"] == "noel.le-goff11@chu-rennes.mssante.fr")
    assert per["practitioner"]["identifier"] == "10018780170" and per["organisation"]["id_type"] == "FINESS"


def test_export_round_trip_into_a_fresh_directory(factory: sessionmaker[Session], tmp_path: Path,
                                                  database_url: str) -> None:
    import_file(factory, MSS, local_domains=["a.mssante.test"])
    with factory() as session:
        first = io.StringIO()
        export_directory(session, first, fmt="mss")
    # wipe the mailboxes, practitioners and organisations, then load the export back
    with transaction(factory) as session:
        session.query(Mailbox).delete()
        session.query(Practitioner).delete()
        session.query(Organisation).delete()
    path = tmp_path / "Extraction_Correspondance_MSSante_export.txt"
    path.write_text(first.getvalue(), encoding="utf-8")
    report = import_file(factory, path, local_domains=["a.mssante.test"])
    assert report.created == 200
    with factory() as session:
        second = io.StringIO()
        export_directory(session, second, fmt="mss")
    assert second.getvalue() == first.getvalue()


def test_export_unknown_format(factory: sessionmaker[Session]) -> None:
    with factory() as session, pytest.raises(DirectoryError, match="unknown export format"):
        export_directory(session, io.StringIO(), fmt="csv")


def _luhn_reference(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def test_fast_luhn_agrees_with_the_reference() -> None:
    import random

    rng = random.Random(7)
    samples = [rpps(f"{n:010d}") for n in range(0, 10**10, 10**10 // 997)]
    samples += ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 14))) for _ in range(5000)]
    for digits in samples:
        assert luhn_valid(digits) == _luhn_reference(digits), digits
