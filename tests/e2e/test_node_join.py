"""A second node of an operator is made by ``mssgw init`` on a new home with the same database: it joins.

On a real PostgreSQL shared by two homes, through the command line.  Node 1 is a first node
(``mssgw init``: its home holds the KEK).  ``mssgw init`` on node 2's empty home refuses, and
writes nothing (no settings, no key file, no row), without a KEK or with another one; with the
operator's KEK (``MSSGW_KEK``) it joins: no new anchor or ``sign`` row, the same operator
certificate and CA as node 1, a TLS listener certificate of its own that ``openssl verify``
chains to that CA, and no private key in clear in its home but the listener's.  Then node 2,
which has neither ``ca.key`` nor ``operator.key``, issues a mailbox certificate (``openssl
verify`` accepts it against the CA), revokes it (its CRL, and node 1's once re-signed, list it:
``openssl verify -crl_check`` refuses it), and seals the audit trail with the sealed operator key
(``openssl`` checks the signature against the operator certificate).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from cli.main import cli
from directory.db import make_engine, read_session_factory, session_factory
from directory.models import Certificate, SealedSecret
from gateway.audit.seal import canonical
from gateway.audit.trail import AuditEvent, append

BOX = "secretariat@a.mssante.test"


def run(home: Path, *args: str, env: dict[str, str | None] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args], env=env)
    return result.exit_code, result.output


def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, check=False)


def rows(url: str) -> dict[str, object]:
    """What init could add to the shared database: certificates by purpose, sealed secrets."""
    engine = make_engine(url)
    try:
        with read_session_factory(engine)() as s:
            counts = dict(s.execute(select(Certificate.purpose, func.count()).group_by(Certificate.purpose)).all())
            secrets = sorted(s.scalars(select(SealedSecret.name)))
            sign = list(s.scalars(select(Certificate.fingerprint).where(Certificate.purpose == "sign")))
        return {"counts": counts, "secrets": secrets, "sign": sign}
    finally:
        engine.dispose()


def clear_keys(home: Path) -> list[str]:
    """Every file under ``home`` holding a private key in clear, by name."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if p.is_file() and b"PRIVATE KEY" in p.read_bytes())  # fmt: skip


@pytest.mark.postgres
def test_a_second_node_joins_the_operator_and_issues_and_revokes(tmp_path: Path, postgres_url: str,
                                                                 pki_template: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MSSGW_DATABASE_URL", postgres_url)
    monkeypatch.delenv("MSSGW_KEK", raising=False)
    node1, node2 = tmp_path / "node1", tmp_path / "node2"
    node1.mkdir()
    shutil.copytree(pki_template, node1 / "pki")
    code, out = run(node1, "init", "--domain", "a.mssante.test")
    assert code == 0 and "joined" not in out, out
    assert run(node1, "directory", "add-mailbox", BOX, "--type", "ORG", "--name", "Secretariat")[0] == 0
    before = rows(postgres_url)
    assert before["counts"] == {"anchor": 1, "sign": 1, "server": 1}, before
    assert any(name.startswith("key:") for name in before["secrets"])  # type: ignore[union-attr]
    kek = base64.b64encode((node1 / "kek").read_bytes()).decode()

    # Without a KEK, then with another one: refused in one sentence, nothing written anywhere.
    for given, says in ((None, "no key-encryption key"),
                        (base64.b64encode(os.urandom(32)).decode(), "give every node the same kek")):  # fmt: skip
        code, out = run(node2, "init", "--domain", "a.mssante.test", env={"MSSGW_KEK": given})
        assert code != 0 and "cannot join operator a.mssante.test" in out and says in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        assert not node2.exists() or not any(node2.rglob("*")), sorted(node2.rglob("*"))
        assert rows(postgres_url) == before

    # Another domain on this operator's database: refused, never a second operator made there.
    code, out = run(node2, "init", "--domain", "x.mssante.test", env={"MSSGW_KEK": kek})
    assert code != 0 and "holds operator a.mssante.test" in out and "--domain a.mssante.test" in out, out
    assert not node2.exists() or not any(node2.rglob("*"))
    assert rows(postgres_url) == before

    # With the operator's KEK: it joins.
    code, out = run(node2, "init", "--domain", "a.mssante.test", "--hostname", "node2.a.mssante.test",
                    env={"MSSGW_KEK": kek})  # fmt: skip
    assert code == 0 and out.startswith("joined operator a.mssante.test"), out
    assert "issued for this node by the development CA" in out, out
    assert rows(postgres_url) == before  # no anchor, sign certificate, sealed key or row of its own
    for name in ("ca.pem", "operator.pem"):
        assert (node2 / "pki" / name).read_bytes() == (node1 / "pki" / name).read_bytes()
    assert clear_keys(node2) == ["pki/server.key"] and not (node2 / "kek").exists()
    assert (node2 / "pki" / "server.key").stat().st_mode & 0o777 == 0o600
    ca2, server2 = str(node2 / "pki" / "ca.pem"), str(node2 / "pki" / "server.pem")
    check = openssl("verify", "-CAfile", ca2, "-purpose", "sslserver", server2)
    assert check.returncode == 0, check.stderr
    assert (node2 / "pki" / "server.pem").read_bytes() != (node1 / "pki" / "server.pem").read_bytes()
    names = openssl("x509", "-in", server2, "-noout", "-ext", "subjectAltName").stdout
    assert b"DNS:node2.a.mssante.test" in names
    code, out = run(node2, "certs", "ca")  # what peers are given, from a node without ca.key
    assert code == 0 and out.strip() == (node1 / "pki" / "ca.pem").read_text().strip(), out
    again = run(node2, "init", env={"MSSGW_KEK": kek})  # idempotent: the listener certificate is kept
    assert again[0] == 0 and "kept" in again[1] and rows(postgres_url) == before, again[1]

    # certs issue on node 2, which has no CA key file: the CA key sealed in the database signs.
    code, out = run(node2, "certs", "issue", BOX, "--json", env={"MSSGW_KEK": kek})
    assert code == 0, out
    issued = json.loads(out)
    code, pem = run(node2, "certs", "show", issued["fingerprint"], "--pem", env={"MSSGW_KEK": kek})
    assert code == 0, pem
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(pem[pem.index("-----BEGIN CERTIFICATE-----"):])
    check = openssl("verify", "-CAfile", ca2, "-purpose", "smimesign", str(leaf))
    assert check.returncode == 0, check.stderr

    # Revoked on node 2: its CRL lists it; node 1's does once re-signed (made from the directory).
    code, out = run(node2, "certs", "revoke", issued["fingerprint"], env={"MSSGW_KEK": kek})
    assert code == 0, out
    for home in (node2, node1):
        if home == node1:
            code, out = run(node1, "certs", "crl", "update")
            assert "CRL re-signed" in out, out
        refused = openssl("verify", "-crl_check", "-CAfile", str(home / "pki" / "ca.pem"), "-CRLfile",
                          str(home / "pki" / "crl.pem"), str(leaf))  # fmt: skip
        assert refused.returncode != 0 and b"revoked" in refused.stdout + refused.stderr, refused

    # The audit seal of node 2: the sealed operator key, checked against the operator certificate.
    engine = make_engine(postgres_url)
    try:
        with session_factory(engine)() as db, db.begin():
            append(db, [AuditEvent("rcpt", "accept", sender=BOX, recipient=BOX, rule="known-recipient")])
    finally:
        engine.dispose()
    code, out = run(node2, "audit", "seal", env={"MSSGW_KEK": kek})
    assert code == 0 and out.startswith("sealed seq"), out
    seal = json.loads((node2 / "audit" / "seals.jsonl").read_text().splitlines()[-1])
    (tmp_path / "data").write_bytes(canonical(seal))
    (tmp_path / "sig").write_bytes(base64.b64decode(seal["sig"]))
    (tmp_path / "pub.pem").write_bytes(openssl("x509", "-in", str(node2 / "pki" / "operator.pem"), "-pubkey",
                                               "-noout").stdout)  # fmt: skip
    check = openssl("dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-sigopt", "rsa_padding_mode:pss",
                    "-sigopt", "rsa_pss_saltlen:32", "-signature", str(tmp_path / "sig"), str(tmp_path / "data"))
    assert check.returncode == 0 and b"Verified OK" in check.stdout, check
    assert clear_keys(node2) == ["pki/server.key"]
