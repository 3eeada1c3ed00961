"""Per-peer encryption policy in the CLI (``peers``, ``domains``, whitelist) and ``clients`` refusing foreign domains.

The policy decides what the inbound pipeline accepts from a peer (a signed, unencrypted message
over pinned mutual TLS: the MSSanté mode, end to end in ``tests/e2e/test_mssante_mode.py``);
here: its defaults, how admins set it, how it is shown, and what ``signed_only_accepted``
answers from the rows the CLI wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from certs.pki import create_dev_pki
from cli.main import cli
from directory.db import make_engine, session_factory
from directory.facts import signed_only_accepted
from gateway.config import load_settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "annuaire"
PEER = "b.mssante.test"
PEER_DN = "C=FR,O=Operateur b.mssante.test,CN=mx.b.mssante.test"


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--data-dir", str(home), *args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def _peer(home: Path, domain: str = PEER) -> dict[str, object]:
    return json.loads(ok(run(home, "peers", "show", domain, "--json")).stdout)  # type: ignore[no-any-return]


def _domains(home: Path) -> dict[str, dict[str, object]]:
    return {d["domain"]: d for d in json.loads(ok(run(home, "domains", "list", "--json")).stdout)}


def _accepted(home: Path, peer: str, from_domain: str) -> bool:
    engine = make_engine(load_settings(home).database_url)
    try:
        with session_factory(engine)() as session:
            return signed_only_accepted(session, peer, from_domain)
    finally:
        engine.dispose()


@pytest.fixture
def peer_ca(tmp_path: Path) -> Path:
    create_dev_pki(tmp_path / "peer-pki", PEER, f"mx.{PEER}")
    return tmp_path / "peer-pki" / "ca.pem"


def test_peers_add_requires_encryption_unless_told_otherwise(operator_home: Path, peer_ca: Path) -> None:
    add = ["peers", "add", PEER, "--ca", str(peer_ca), "--relay", "127.0.0.1:2025", "--operator-dn", PEER_DN]
    r = ok(run(operator_home, *add))
    assert "not encrypted" not in r.stdout
    assert _peer(operator_home)["require_encryption"] is True
    assert not _accepted(operator_home, PEER, PEER)

    r = ok(run(operator_home, *add, "--no-require-encryption"))
    assert "signed over pinned mutual TLS, not encrypted end to end" in r.stdout
    assert _peer(operator_home)["require_encryption"] is False
    assert _domains(operator_home)[PEER]["require_encryption"] is False
    table = ok(run(operator_home, "peers", "list")).stdout.splitlines()
    assert "REQUIRE_ENCRYPTION" in table[0] and " False " in next(line for line in table if line.startswith(PEER))
    assert _accepted(operator_home, PEER, PEER)
    assert not _accepted(operator_home, PEER, "a.mssante.test")  # our own domain: never through a peer

    ok(run(operator_home, *add))  # re-adding without the flag keeps the admin's choice
    assert _peer(operator_home)["require_encryption"] is False
    ok(run(operator_home, "domains", "trust", PEER, "--require-encryption"))
    assert _peer(operator_home)["require_encryption"] is True
    assert not _accepted(operator_home, PEER, PEER)


def test_whitelist_peers_follow_the_mssante_model(operator_home: Path) -> None:
    ok(run(operator_home, "peers", "import-whitelist", str(FIXTURES / "listeblanchemssante.xml")))
    peers = json.loads(ok(run(operator_home, "peers", "list", "--json")).stdout)
    assert peers and all(p["require_encryption"] is False for p in peers if p["operator_dn"])
    medecin, pharmacien = "medecin.mssante.fr", "pharmacien.mssante.fr"
    assert _accepted(operator_home, medecin, medecin)
    assert not _accepted(operator_home, medecin, pharmacien)  # another operator's domain: not through this one
    # an admin's choice survives the next import of the list
    ok(run(operator_home, "domains", "trust", medecin, "--require-encryption"))
    ok(run(operator_home, "peers", "import-whitelist", str(FIXTURES / "listeblanchemssante.xml")))
    assert _peer(operator_home, medecin)["require_encryption"] is True


def test_relaxing_a_peer_without_a_pinned_identity_changes_nothing(operator_home: Path) -> None:
    r = ok(run(operator_home, "domains", "trust", "c.mssante.test", "--relay", "127.0.0.1:2026",
               "--no-require-encryption"))  # fmt: skip
    assert "no --operator-dn" in r.stderr
    assert _domains(operator_home)["c.mssante.test"]["require_encryption"] is True
    assert not _accepted(operator_home, "c.mssante.test", "c.mssante.test")


def test_clients_autoconfig_refuses_a_domain_that_is_not_ours(sqlite_home: Path) -> None:
    for command in ("autoconfig", "srv"):
        r = run(sqlite_home, "clients", command, "--domain", "medecin.mssante.fr")
        assert r.exit_code == 2, r.output
        assert "'medecin.mssante.fr' is not one of our domains (a.mssante.test)" in r.stderr
        assert "Traceback" not in r.output and not r.stdout
    r = ok(run(sqlite_home, "clients", "autoconfig", "--domain", "A.MSSante.test."))
    assert "<domain>a.mssante.test</domain>" in r.stdout
    assert "_submission._tcp.a.mssante.test." in ok(run(sqlite_home, "clients", "srv", "--domain",
                                                         "a.mssante.test")).stdout  # fmt: skip
