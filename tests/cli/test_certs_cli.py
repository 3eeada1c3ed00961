"""``mssgw certs`` through the real command line, checked with openssl as an independent oracle."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from click.testing import CliRunner

from cli.main import cli

RPPS = "10000000009"  # Luhn-valid
ADDRESS = "anne.martin@a.mssante.test"


def run(home: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args], input=input)
    return result.exit_code, result.stdout, result.stderr


def _mailbox(home: Path, address: str = ADDRESS, kind: str = "PER") -> None:
    if kind == "PER":
        assert run(home, "directory", "add-practitioner", "--rpps", RPPS, "--last-name", "Martin",
                   "--first-name", "Anne")[0] == 0
        code, _, err = run(home, "directory", "add-mailbox", address, "--type", "PER", "--rpps", RPPS)
    else:
        code, _, err = run(home, "directory", "add-mailbox", address, "--type", kind, "--name", "Logiciel")
    assert code == 0, err


def test_issue_show_pem_verifies_with_openssl(sqlite_home: Path, tmp_path: Path) -> None:
    _mailbox(sqlite_home)
    code, out, err = run(sqlite_home, "certs", "issue", ADDRESS, "--json")
    assert code == 0, err
    issued = json.loads(out)
    assert issued["address"] == ADDRESS and issued["has_private_key"] and issued["status"] == "valid"
    code, pem, _ = run(sqlite_home, "certs", "show", ADDRESS, "--pem")
    assert code == 0 and "PRIVATE KEY" not in pem
    cert = tmp_path / "anne.pem"
    cert.write_text(pem)
    ca = tmp_path / "ca.pem"
    code, ca_pem, _ = run(sqlite_home, "certs", "ca")
    ca.write_text(ca_pem)
    check = subprocess.run(["openssl", "verify", "-purpose", "smimesign", "-CAfile", str(ca), str(cert)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # The private key is sealed in the database (every node uses it), not a file of this node.
    assert list((sqlite_home / "keys").glob("*")) == []
    import sqlite3

    with sqlite3.connect(sqlite_home / "mssgw.db") as db:
        key_path, = db.execute("SELECT key_path FROM certificates WHERE address = ?", (ADDRESS,)).fetchone()
        sealed = db.execute("SELECT count(*) FROM sealed_secrets WHERE name = ?", (f"key:{issued['fingerprint']}",))
        assert key_path == f"sealed:key:{issued['fingerprint']}" and sealed.fetchone() == (1,)


def test_revoke_puts_serial_in_crl(sqlite_home: Path) -> None:
    _mailbox(sqlite_home)
    issued = json.loads(run(sqlite_home, "certs", "issue", ADDRESS, "--json")[1])
    code, out, _ = run(sqlite_home, "certs", "revoke", ADDRESS, "--reason", "key_compromise")
    assert code == 0 and issued["fingerprint"] in out
    text = subprocess.run(["openssl", "crl", "-in", str(sqlite_home / "pki" / "crl.pem"), "-noout", "-text",
                           "-CAfile", str(sqlite_home / "pki" / "ca.pem")], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert issued["serial"].upper().lstrip("0") in text.stdout.replace(":", "").upper()
    listed = json.loads(run(sqlite_home, "certs", "list", "--address", ADDRESS, "--json")[1])
    assert [c["status"] for c in listed] == ["revoked"]


def test_export_pkcs12_opens_with_openssl(sqlite_home: Path, tmp_path: Path) -> None:
    _mailbox(sqlite_home)
    run(sqlite_home, "certs", "issue", ADDRESS)
    out = tmp_path / "anne.p12"
    code, _, err = run(sqlite_home, "certs", "export", ADDRESS, "--pkcs12", str(out), input="s3cret-passphrase\n")
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o600
    opened = subprocess.run(["openssl", "pkcs12", "-in", str(out), "-nodes", "-passin", "pass:s3cret-passphrase"],
                            capture_output=True, text=True)
    assert opened.returncode == 0, opened.stderr
    assert "PRIVATE KEY" in opened.stdout and "CERTIFICATE" in opened.stdout
    code, _, err = run(sqlite_home, "certs", "export", ADDRESS, "--pkcs12", str(out), input="short\n")
    assert code != 0 and "at least 8" in err


def test_import_pkcs12_of_an_app_and_reimport_round_trip(sqlite_home: Path, tmp_path: Path) -> None:
    """A certificate made by openssl (PKCS#12) imports with its key for an APP mailbox."""
    _mailbox(sqlite_home, "erx@a.mssante.test", kind="APP")
    pki = sqlite_home / "pki"
    key, csr, crt, p12 = (tmp_path / n for n in ("k.pem", "r.csr", "c.pem", "b.p12"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=email:erx@a.mssante.test\nextendedKeyUsage=emailProtection,clientAuth\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=erx"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.pem"), "-CAkey",
                    str(pki / "ca.key"), "-CAcreateserial", "-out", str(crt), "-days", "30", "-extfile", str(ext)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "pkcs12", "-export", "-in", str(crt), "-inkey", str(key), "-out", str(p12),
                    "-passout", "pass:p12-passphrase"], check=True, capture_output=True)
    code, out, err = run(sqlite_home, "certs", "import", "erx@a.mssante.test", str(p12), "--passphrase-stdin",
                         input="p12-passphrase\n")
    assert code == 0, err
    assert "with its private key" in out
    code, _, err = run(sqlite_home, "certs", "import", "erx@a.mssante.test", str(p12), "--passphrase-stdin",
                       input="wrong\n")
    assert code == 2 and err.startswith("error:") and "Traceback" not in err


def test_errors_are_one_line(sqlite_home: Path, tmp_path: Path) -> None:
    code, _, err = run(sqlite_home, "certs", "issue", "nobody@a.mssante.test")
    assert code == 1 and err.strip().count("\n") == 0 and "no mailbox" in err  # not found: exit 1
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    _mailbox(sqlite_home)
    code, _, err = run(sqlite_home, "certs", "import", ADDRESS, str(garbage))
    assert code == 2 and "Traceback" not in err
    code, _, err = run(sqlite_home, "certs", "trust-anchor", "add", str(garbage))
    assert code == 2


def test_trust_anchor_add_list_remove(sqlite_home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    from gateway.operator import init_operator

    init_operator(other, domain="b.mssante.test")
    code, _, err = run(sqlite_home, "certs", "trust-anchor", "add", str(other / "pki" / "ca.pem"))
    assert code == 0, err
    anchors = json.loads(run(sqlite_home, "certs", "trust-anchor", "list", "--json")[1])
    assert len(anchors) == 2
    fpr = next(a["fingerprint"] for a in anchors if "b.mssante.test" in a["subject"])
    assert run(sqlite_home, "certs", "trust-anchor", "remove", fpr)[0] == 0
    assert len(json.loads(run(sqlite_home, "certs", "trust-anchor", "list", "--json")[1])) == 1
    # a leaf is not an anchor
    code, _, err = run(sqlite_home, "certs", "trust-anchor", "add", str(other / "pki" / "server.pem"))
    assert code == 2 and "CA certificate" in err


def _gpg_key(tmp_path: Path, email: str) -> tuple[Path, str]:
    """A key made by an independent gpg keyring; returns its armored public key file and fingerprint."""
    gh = tmp_path / "other-gnupg"
    gh.mkdir(mode=0o700)
    base = ["gpg", "--homedir", str(gh), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*base, "--quick-gen-key", f"Dr Other <{email}>", "rsa2048", "sign,encrypt", "1y"],
                   check=True, capture_output=True)
    listing = subprocess.run([*base, "--with-colons", "--list-keys", email], check=True, capture_output=True,
                             text=True).stdout
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))
    out = tmp_path / "pub.asc"
    out.write_bytes(subprocess.run([*base, "--armor", "--export", fpr], check=True, capture_output=True).stdout)
    subprocess.run(["gpgconf", "--homedir", str(gh), "--kill", "gpg-agent"], check=False)
    return out, fpr


def test_pgp_import_list_revoke(sqlite_home: Path, tmp_path: Path) -> None:
    run(sqlite_home, "domains", "trust", "b.mssante.test", "--relay", "127.0.0.1:2525")
    run(sqlite_home, "directory", "add-mailbox", "bob@b.mssante.test", "--type", "ORG", "--name", "B")
    key, fpr = _gpg_key(tmp_path, "bob@b.mssante.test")
    code, out, err = run(sqlite_home, "certs", "pgp", "import", "bob@b.mssante.test", str(key))
    assert code == 0, err
    assert fpr in out
    listed = json.loads(run(sqlite_home, "certs", "pgp", "list", "--json")[1])
    assert listed == [{"address": "bob@b.mssante.test", "fingerprint": fpr, "has_secret": False, "status": "valid"}]
    # the recipient can now be reached: OpenPGP is a way to protect mail for it
    code, out, _ = run(sqlite_home, "domains", "check", "bob@b.mssante.test", "--json")
    assert code == 0 and json.loads(out)["protection"] == "openpgp"
    assert run(sqlite_home, "certs", "pgp", "revoke", fpr)[0] == 0
    assert json.loads(run(sqlite_home, "certs", "pgp", "list", "--json")[1])[0]["status"] == "revoked"
    code, out, _ = run(sqlite_home, "domains", "check", "bob@b.mssante.test", "--json")
    assert code == 1 and json.loads(out)["rule"] == "no-protection"


def test_pgp_key_must_name_the_address(sqlite_home: Path, tmp_path: Path) -> None:
    run(sqlite_home, "domains", "trust", "b.mssante.test", "--relay", "127.0.0.1:2525")
    run(sqlite_home, "directory", "add-mailbox", "bob@b.mssante.test", "--type", "ORG", "--name", "B")
    key, _ = _gpg_key(tmp_path, "mallory@b.mssante.test")
    code, _, err = run(sqlite_home, "certs", "pgp", "import", "bob@b.mssante.test", str(key))
    assert code == 2 and "no user id for bob@b.mssante.test" in err


def test_crl_update_fetches_distribution_points(sqlite_home: Path, tmp_path: Path) -> None:
    """A peer CA's CRL is fetched from the distribution point named in its certificates (loopback HTTP)."""
    import functools
    import http.server
    import threading

    from certs import pki
    from gateway.operator import init_operator

    peer = tmp_path / "peer"
    init_operator(peer, domain="b.mssante.test")
    peer_pki = pki.load_dev_pki(peer / "pki")
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/peer.crl"
        cert, _ = pki.issue_certificate(peer_pki, kind="user", email="bob@b.mssante.test", crl_url=url)
        pki.revoke_certificate(peer_pki, cert.serial_number)
        (served / "peer.crl").write_bytes((peer / "pki" / "crl.pem").read_bytes())
        cert_file = tmp_path / "bob.pem"
        from cryptography.hazmat.primitives import serialization

        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        run(sqlite_home, "domains", "trust", "b.mssante.test", "--relay", "127.0.0.1:2525")
        run(sqlite_home, "directory", "add-mailbox", "bob@b.mssante.test", "--type", "ORG", "--name", "B")
        code, _, err = run(sqlite_home, "certs", "import", "bob@b.mssante.test", str(cert_file))
        assert code == 0, err
        code, out, err = run(sqlite_home, "certs", "crl", "update")
        assert code == 0, out + err
        assert f"fetched {url}: 1 revoked" in out
        fetched = list((sqlite_home / "pki" / "crls").glob("*.pem"))
        assert len(fetched) == 1 and fetched[0].read_bytes() == (peer / "pki" / "crl.pem").read_bytes()
        (served / "peer.crl").unlink()  # the point goes away: the cached copy stays, the command says so
        code, out, _ = run(sqlite_home, "certs", "crl", "update")
        assert code == 1 and "FAILED" in out and "kept the cached copy" in out
        assert fetched[0].exists()
    finally:
        server.shutdown()
        server.server_close()


def test_clients_autoconfig_and_srv(sqlite_home: Path) -> None:
    import xml.etree.ElementTree as ET

    code, out, _ = run(sqlite_home, "clients", "autoconfig")
    assert code == 0
    root = ET.fromstring(out)  # noqa: S314 (our own output)
    ports = {s.findtext("port") for s in root.iter("incomingServer")}
    assert ports == {"1993", "1143"}
    code, out, _ = run(sqlite_home, "clients", "srv")
    assert code == 0 and "_submissions._tcp.a.mssante.test." in out and "_imaps._tcp.a.mssante.test." in out
