"""``mssgw domains``: trust list, blocks, whitelist import and ``check`` decisions, on both databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import cli
from directory.identifiers import luhn_valid

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "annuaire"
DN = "CN=mx.b.mssante.test,O=Operateur B,C=FR"


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--data-dir", str(home), *args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def rpps(body: str) -> str:
    return next(body + k for k in "0123456789" if luhn_valid(body + k))


@pytest.fixture
def populated(operator_home: Path) -> Path:
    home = operator_home
    ok(run(home, "directory", "add-practitioner", "--rpps", rpps("1011111111"), "--last-name", "Local",
           "--first-name", "Ann"))
    ok(run(home, "directory", "add-mailbox", "ann@a.mssante.test", "--type", "PER", "--rpps", rpps("1011111111")))
    ok(run(home, "directory", "add-mailbox", "gone@a.mssante.test", "--type", "ORG"))
    ok(run(home, "directory", "deactivate", "gone@a.mssante.test"))
    ok(run(home, "domains", "trust", "b.mssante.test", "--relay", "127.0.0.1:2525", "--operator-dn", DN))
    ok(run(home, "directory", "add-mailbox", "bob@b.mssante.test", "--type", "ORG"))
    return home


#: (address, exit status, reply, rule, words of the reason): what the SMTP edge would answer.
CHECKS = [
        ("ann@a.mssante.test", 0, "250 2.1.5", "known-recipient", "active local mailbox"),
        ("bob@b.mssante.test", 0, "250 2.1.5", "known-recipient", "trusted operator b.mssante.test"),
        ("someone@gmail.com", 1, "550 5.7.1", "consumer-domain",
         "consumer mailbox: health data may not be sent to gmail.com"),
        ("someone@yahoo.fr", 1, "550 5.7.1", "consumer-domain", "yahoo.fr"),
        ("x@nowhere.example", 1, "550 5.7.1", "untrusted-domain", "not a mail domain of the health trust space"),
        ("nobody@b.mssante.test", 1, "550 5.1.1", "unknown-mailbox", "not a mailbox"),
        ("gone@a.mssante.test", 1, "550 5.1.1", "inactive-mailbox", "deactivated"),
]


def test_check(populated: Path) -> None:
    for address, exit_code, code, rule, reason in CHECKS:
        check_one(populated, address, exit_code, code, rule, reason)


def check_one(populated: Path, address: str, exit_code: int, code: str, rule: str, reason: str) -> None:
    r = run(populated, "domains", "check", address)
    assert r.exit_code == exit_code, r.output
    assert r.stdout.startswith("ACCEPT" if exit_code == 0 else "REFUSE")
    assert code in r.stdout and f"[{rule}]" in r.stdout and reason in r.stdout
    data = json.loads(run(populated, "domains", "check", address, "--json").stdout)
    assert data["rule"] == rule and data["decision"] == ("accept" if exit_code == 0 else "refuse")
    assert f"{data['code']} {data['enhanced_code']}" == code


def test_check_trusted_remote_carries_operator_protection(populated: Path) -> None:
    data = json.loads(run(populated, "domains", "check", "bob@b.mssante.test", "--json").stdout)
    assert data["protection"] == "mtls-signed"


def test_check_inbound(populated: Path) -> None:
    assert run(populated, "domains", "check", "ann@a.mssante.test", "--inbound").exit_code == 0
    r = run(populated, "domains", "check", "bob@b.mssante.test", "--inbound")
    assert r.exit_code == 1 and "[not-local]" in r.stdout


def test_trust_block_list_remove(operator_home: Path) -> None:
    home = operator_home
    r = ok(run(home, "domains", "trust", "c.mssante.test"))
    assert "c.mssante.test trusted" in r.stdout and "goes to its MX records" in r.stderr
    ok(run(home, "domains", "trust", "c.mssante.test", "--mx", "--openpgp"))
    ok(run(home, "domains", "block", "evil.example", "--reason", "phishing"))
    rows = json.loads(ok(run(home, "domains", "list", "--json")).stdout)
    by_name = {row["domain"]: row for row in rows}
    assert by_name["c.mssante.test"]["use_mx"] and by_name["c.mssante.test"]["prefers_openpgp"]
    assert by_name["evil.example"]["reason"] == "phishing" and by_name["a.mssante.test"]["kind"] == "local"
    assert by_name["gmail.com"]["kind"] == "blocked"
    r = ok(run(home, "domains", "list", "--kind", "trusted"))
    assert "c.mssante.test" in r.stdout and "gmail.com" not in r.stdout
    r = run(home, "domains", "check", "x@evil.example")
    assert r.exit_code == 1 and "[blocked-domain]" in r.stdout and "phishing" in r.stdout
    ok(run(home, "domains", "remove", "evil.example"))
    assert "evil.example" not in ok(run(home, "domains", "list")).stdout


ERRORS = [
        (("domains", "block", "evil.example", "--reason", "  "), "needs a reason"),
        (("domains", "trust", "a.mssante.test"), "one of our own domains"),
        (("domains", "trust", "c.mssante.test", "--relay", "nohost"), "HOST:PORT"),
        (("domains", "block", "a.mssante.test", "--reason", "x"), "one of our own domains"),
]


def test_errors_are_one_line(operator_home: Path) -> None:
    r = run(operator_home, "domains", "remove", "never.example")  # not found: exit 1, as in the README
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.strip() == "error: no domain never.example in the trust list"
    for args, message in ERRORS:
        r = run(operator_home, *args)
        assert r.exit_code == 2 and r.stdout == "", args
        assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "Traceback" not in r.stderr


def test_block_without_reason_option(operator_home: Path) -> None:
    r = run(operator_home, "domains", "block", "evil.example")
    assert r.exit_code == 2 and "--reason" in r.stderr and "Traceback" not in r.stderr


def test_import_whitelist(operator_home: Path, tmp_path: Path) -> None:
    r = ok(run(operator_home, "domains", "import-whitelist", str(FIXTURES / "listeblanchemssante.xml")))
    assert "12 created" in r.stdout
    report = json.loads(ok(run(operator_home, "domains", "import-whitelist",
                               str(FIXTURES / "listeblanchemssante.xml"), "--json")).stdout)
    assert report["unchanged"] == 12
    evil = tmp_path / "evil.xml"
    evil.write_text('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><ListeBlanche/>', encoding="utf-8")
    r = run(operator_home, "domains", "import-whitelist", str(evil))
    assert r.exit_code == 2 and "DTD" in r.stderr and len(r.stderr.strip().splitlines()) == 1
