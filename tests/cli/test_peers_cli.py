"""``mssgw peers``: one step to connect a peer operator, listings, removal, export bundles and their attacks.

The peer (B) is a second development PKI made by ``certs.pki``; its bundle is written by the
real ``mssgw peers export`` of a B home that has settings and a PKI but no database (export
reads no table). Exit statuses follow the CLI convention: 0 done, 1 not found, 2 usage or
bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from certs.pki import create_dev_pki
from cli.main import cli
from gateway.config import CONFIG_NAME, render_toml

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "annuaire"
B = "b.mssante.test"
B_DN = "C=FR,O=Operateur b.mssante.test,CN=mx.b.mssante.test"


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--data-dir", str(home), *args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def peer_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """B's home: settings (inbound on 127.0.0.1:2025) and a development PKI, no database needed."""
    home = tmp_path_factory.mktemp("peer-b")
    overrides = {"operator": {"domains": [B], "hostname": f"mx.{B}"}, "listen": {"inbound": "127.0.0.1:2025"}}
    (home / CONFIG_NAME).write_text(render_toml(overrides), encoding="utf-8")
    create_dev_pki(home / "pki", B, f"mx.{B}")
    return home


@pytest.fixture
def bundle(peer_home: Path, tmp_path: Path) -> Path:
    path = tmp_path / "b.peer.json"
    r = ok(run(peer_home, "peers", "export", "-o", str(path)))
    assert str(path) in r.stdout
    return path


def _state(home: Path) -> tuple[object, ...]:
    peers = json.loads(ok(run(home, "peers", "list", "--json")).stdout)
    anchors = json.loads(ok(run(home, "certs", "trust-anchor", "list", "--json")).stdout)
    trusted = json.loads(ok(run(home, "domains", "list", "--kind", "trusted", "--json")).stdout)
    return peers, sorted(a["fingerprint"] for a in anchors), trusted


def test_export_holds_what_a_peer_needs_and_no_secret(peer_home: Path) -> None:
    r = ok(run(peer_home, "peers", "export"))
    data = json.loads(r.stdout)
    assert data["mssgw_peer"] == 1 and data["domains"] == [B] and data["inbound"] == "127.0.0.1:2025"
    assert data["operator_dn"] == B_DN
    assert data["ca_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert (peer_home / "pki" / "ca.pem").read_text().strip() == data["ca_pem"].strip()
    assert "PRIVATE" not in r.stdout
    override = json.loads(ok(run(peer_home, "peers", "export", "--inbound", "mx.b.mssante.test:25")).stdout)
    assert override["inbound"] == "mx.b.mssante.test:25"


def test_add_from_bundle_is_one_idempotent_step(operator_home: Path, bundle: Path) -> None:
    before = _state(operator_home)
    r = ok(run(operator_home, "peers", "add", "--from", str(bundle)))
    assert f"{B}: peer trusted (relay 127.0.0.1:2025; operator {B_DN})" in r.stdout
    after = _state(operator_home)
    peers, anchors, trusted = after
    assert len(anchors) == len(before[1]) + 1  # B's CA became a trust anchor
    assert [(p["domain"], p["relay"], p["operator_dn"]) for p in peers] == [(B, "127.0.0.1:2025", B_DN)]  # type: ignore[attr-defined]
    assert [t["domain"] for t in trusted] == [B]  # type: ignore[attr-defined]
    ok(run(operator_home, "peers", "add", "--from", str(bundle)))
    assert _state(operator_home) == after  # the same command twice: the same rows
    shown = json.loads(ok(run(operator_home, "peers", "show", B, "--json")).stdout)
    assert shown["anchors"][0]["subject"].endswith(f"CN=mssgw dev CA {B}") and shown["operator_cert"]
    # The recipient check of the SMTP edge now sees a trusted operator's domain.
    ok(run(operator_home, "directory", "add-mailbox", f"paul@{B}", "--type", "ORG"))
    assert run(operator_home, "domains", "check", f"paul@{B}").exit_code == 0


def test_add_with_options_and_mx_route(operator_home: Path, peer_home: Path) -> None:
    pki = peer_home / "pki"
    r = ok(run(operator_home, "peers", "add", B, "--ca", str(pki / "ca.pem"), "--mx",
               "--operator-cert", str(pki / "operator.pem")))  # fmt: skip
    assert f"{B}: peer trusted (mx; operator {B_DN})" in r.stdout
    ok(run(operator_home, "peers", "add", B, "--ca", str(pki / "ca.pem"), "--relay", "127.0.0.1:2526",
           "--operator-dn", B_DN))  # fmt: skip
    shown = json.loads(ok(run(operator_home, "peers", "show", B, "--json")).stdout)
    assert shown["relay"] == "127.0.0.1:2526" and shown["use_mx"] is False and shown["operator_dn"] == B_DN


def test_remove_takes_the_domain_its_ca_and_certificate_away(operator_home: Path, bundle: Path) -> None:
    before = _state(operator_home)
    ok(run(operator_home, "peers", "add", "--from", str(bundle)))
    assert ok(run(operator_home, "peers", "remove", B)).stdout.strip() == f"{B}: peer removed"
    assert _state(operator_home) == before
    assert run(operator_home, "certs", "list", "--json").stdout.count(B) == 0


@pytest.mark.parametrize("args", [("peers", "show", "c.mssante.test"), ("peers", "remove", "c.mssante.test"),
                                  ("peers", "show", "a.mssante.test")])  # fmt: skip
def test_unknown_peer_exits_1_with_one_line(operator_home: Path, args: tuple[str, ...]) -> None:
    r = run(operator_home, *args)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "not a peer operator's domain" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_input_exits_2_and_changes_nothing(operator_home: Path, peer_home: Path, tmp_path: Path) -> None:
    pki = peer_home / "pki"
    before = _state(operator_home)
    other = create_dev_pki(tmp_path / "other", "c.mssante.test", "mx.c.mssante.test")
    junk = tmp_path / "junk.json"
    cases: list[tuple[tuple[str, ...], str]] = [
        ((B, "--ca", str(pki / "ca.pem"), "--operator-dn", B_DN), "--relay HOST:PORT or --mx"),
        ((B, "--ca", str(pki / "ca.pem"), "--relay", "127.0.0.1:25", "--mx", "--operator-dn", B_DN), "exclude"),
        ((B, "--ca", str(pki / "ca.pem"), "--relay", "127.0.0.1:25"), "--operator-dn DN or --operator-cert"),
        ((B, "--relay", "127.0.0.1:25", "--operator-dn", B_DN), "--from FILE"),
        ((B, "--ca", str(pki / "operator.pem"), "--relay", "127.0.0.1:25", "--operator-dn", B_DN), "CA certificate"),
        ((B, "--ca", str(pki / "ca.pem"), "--relay", "127.0.0.1:25", "--operator-cert", str(other.operator_cert)),
         "was not issued by the CA"),
        ((B, "--ca", str(pki / "ca.pem"), "--relay", "127.0.0.1:25", "--operator-cert", str(pki / "operator.pem"),
          "--operator-dn", "CN=someone else"), "differs from the certificate's subject"),
        ((B, "--ca", str(pki / "ca.pem"), "--relay", "nowhere", "--operator-dn", B_DN), "HOST:PORT"),
        (("a.mssante.test", "--ca", str(pki / "ca.pem"), "--relay", "127.0.0.1:25", "--operator-dn", B_DN),
         "one of our own domains"),
        ((B, "--ca", str(tmp_path / "missing.pem"), "--relay", "127.0.0.1:25", "--operator-dn", B_DN), "cannot read"),
        (("--from", str(junk)), "not a peer bundle"),
    ]
    for attack in (b"\x00\xff not json", b'{"mssgw_peer": 2}', b"[1]", b" " * (300 * 1024),
                   b'{"mssgw_peer": 1, "domains": "b.mssante.test"}'):  # fmt: skip
        junk.write_bytes(attack)
        r = run(operator_home, "peers", "add", "--from", str(junk))
        assert r.exit_code == 2 and "Traceback" not in r.output and "bundle" in r.stderr, (attack[:20], r.output)
    junk.write_bytes(b"{}")
    for args, reason in cases:
        r = run(operator_home, "peers", "add", *args)
        assert r.exit_code == 2, (args, r.output)
        assert reason in r.stderr and "Traceback" not in r.output, (args, r.stderr)
        assert r.stdout == "", args
    assert _state(operator_home) == before


def test_import_whitelist_makes_peers(operator_home: Path) -> None:
    r = ok(run(operator_home, "peers", "import-whitelist", str(FIXTURES / "listeblanchemssante.xml")))
    assert r.stdout.strip()
    peers = json.loads(ok(run(operator_home, "peers", "list", "--json")).stdout)
    assert peers and all(p["operator_dn"] for p in peers)
    assert all(p["ca"] == "(shared anchors)" for p in peers)  # the whitelist's CAs are IGC-Santé's anchors


def test_domains_list_filters_by_kind(operator_home: Path, bundle: Path) -> None:
    ok(run(operator_home, "peers", "add", "--from", str(bundle)))
    for kind in ("local", "trusted", "blocked"):
        rows = json.loads(ok(run(operator_home, "domains", "list", "--kind", kind, "--json")).stdout)
        assert rows and {r["kind"] for r in rows} == {kind}
    r = run(operator_home, "domains", "list", "--kind", "friendly")
    assert r.exit_code == 2 and "Traceback" not in r.output
