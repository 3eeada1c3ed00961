"""``mssgw directory``: every command through click, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from cli.main import cli
from directory.identifiers import luhn_valid

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "annuaire"
MSS = FIXTURES / "Extraction_Correspondance_MSSante_202611200300.txt"
PASSWORD = "correct horse battery staple"


def valid_rpps(body: str) -> str:
    return next(body + k for k in "0123456789" if luhn_valid(body + k))


RPPS = valid_rpps("1012345678")


def run(home: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--data-dir", str(home), *args], input=stdin)


def assert_one_line_error(result: Result, text: str) -> None:
    not_found = text.startswith("no mailbox")  # exit 1: refused / not found; 2: usage or bad input
    assert result.exit_code == (1 if not_found else 2), result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_practitioner_mailbox_password_delegation(operator_home: Path) -> None:
    home = operator_home
    r = run(home, "directory", "add-practitioner", "--rpps", RPPS, "--last-name", "Martin", "--first-name", "Marie",
            "--profession", "10", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["national_id"] == "8" + RPPS
    r = run(home, "directory", "add-mailbox", "marie.martin@a.mssante.test", "--type", "PER", "--rpps", RPPS,
            "--password-stdin", stdin=PASSWORD + "\n")
    assert r.exit_code == 0 and "(PER, local)" in r.stdout, r.output
    r = run(home, "directory", "add-mailbox", "secretariat@a.mssante.test", "--type", "ORG", "--name", "Secrétariat")
    assert r.exit_code == 0, r.output
    r = run(home, "directory", "set-password", "secretariat@a.mssante.test", "--password-stdin",
            stdin=PASSWORD + "!\n")
    assert r.exit_code == 0 and "updated" in r.stdout
    r = run(home, "directory", "delegate", "secretariat@a.mssante.test", "marie.martin@a.mssante.test")
    assert r.exit_code == 0 and "may now act for" in r.stdout
    r = run(home, "directory", "show", "marie.martin@a.mssante.test", "--json")
    shown = json.loads(r.stdout)
    assert shown["rpps"] == RPPS and shown["has_password"] and shown["may_send_as"] == ["secretariat@a.mssante.test"]
    assert "password_hash" not in r.stdout and "$argon2" not in r.stdout
    r = run(home, "directory", "show", "secretariat@a.mssante.test")
    assert r.exit_code == 0 and "marie.martin@a.mssante.test" in r.stdout
    r = run(home, "directory", "delegate", "secretariat@a.mssante.test", "marie.martin@a.mssante.test", "--revoke")
    assert r.exit_code == 0 and "may no longer" in r.stdout

    r = run(home, "directory", "list", "--json")
    assert {row["address"] for row in json.loads(r.stdout)} == {"marie.martin@a.mssante.test",
                                                               "secretariat@a.mssante.test"}
    r = run(home, "directory", "list", "--type", "ORG", "--local", "--limit", "5")
    assert r.exit_code == 0 and "secretariat@a.mssante.test" in r.stdout and "marie" not in r.stdout
    r = run(home, "directory", "search", "martin", "--json")
    assert [row["address"] for row in json.loads(r.stdout)] == ["marie.martin@a.mssante.test"]
    r = run(home, "directory", "search", "nobody-at-all")
    assert r.exit_code == 0 and "(none)" in r.stdout

    r = run(home, "directory", "deactivate", "marie.martin@a.mssante.test")
    assert r.exit_code == 0 and "deactivated" in r.stdout
    assert json.loads(run(home, "directory", "show", "marie.martin@a.mssante.test", "--json").stdout)["active"] is False
    r = run(home, "directory", "activate", "marie.martin@a.mssante.test")
    assert r.exit_code == 0 and "activated" in r.stdout


ERRORS = [
        (("directory", "add-practitioner", "--rpps", "10123456789", "--last-name", "X", "--first-name", "Y"), None,
         "Luhn"),
        (("directory", "show", "nobody@a.mssante.test"), None, "no mailbox nobody@a.mssante.test"),
        (("directory", "deactivate", "nobody@a.mssante.test"), None, "no mailbox"),
        (("directory", "add-mailbox", "dr@a.mssante.test", "--type", "PER"), None, "give --rpps"),
        (("directory", "add-mailbox", "x@unknown-operator.fr", "--type", "ORG"), None, "neither one of our domains"),
        (("directory", "add-mailbox", "x@a.mssante.test", "--type", "ORG", "--password-stdin"), "short\n",
         "at least 12 characters"),
        (("directory", "add-mailbox", "not an address", "--type", "ORG"), None, "not a valid mail address"),
]


def test_errors_are_one_line(operator_home: Path) -> None:
    assert not luhn_valid("10123456789")  # the first case really is a bad check digit
    for args, stdin, message in ERRORS:
        assert_one_line_error(run(operator_home, *args, stdin=stdin), message)


def test_usage_errors(operator_home: Path) -> None:
    r = run(operator_home, "directory", "add-practitioner", "--last-name", "X", "--first-name", "Y")
    assert r.exit_code == 2 and "exactly one of --rpps or --adeli" in r.stderr and "Traceback" not in r.stderr
    r = run(operator_home, "directory", "set-password", "x@a.mssante.test", "--password-stdin", stdin="")
    assert r.exit_code == 2 and "no password" in r.stderr


def test_import_and_export(operator_home: Path, tmp_path: Path) -> None:
    r = run(operator_home, "directory", "import", str(MSS), "--quiet")
    assert r.exit_code == 0, r.output
    assert "200 created" in r.stdout
    assert "line 24: expected 31 columns, found 16" in r.stderr and r.stderr.count("  line ") == 6
    r = run(operator_home, "directory", "import", str(MSS), "--json", "--batch-size", "17")
    report = json.loads(r.stdout)
    assert (report["created"], report["unchanged"], len(report["skipped"])) == (0, 200, 6)
    out = tmp_path / "Extraction_Correspondance_MSSante_out.txt"
    r = run(operator_home, "directory", "export", "--format", "mss", "-o", str(out))
    assert r.exit_code == 0 and "200 mailboxes exported" in r.stderr
    r = run(operator_home, "directory", "import", str(out), "--json")
    assert json.loads(r.stdout)["unchanged"] == 200
    r = run(operator_home, "directory", "export")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 200
    json.loads(r.stdout.splitlines()[0])
    r = run(operator_home, "directory", "export", "--local")
    assert r.exit_code == 0 and r.stdout == ""


def test_import_unknown_header(operator_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("hello|world\n", encoding="utf-8")
    assert_one_line_error(run(operator_home, "directory", "import", str(bad)), "unknown file kind")


def test_uninitialised_home(tmp_path: Path) -> None:
    assert_one_line_error(run(tmp_path / "nothing", "directory", "list"), "mssgw init")
