"""The external programs the suite uses as independent oracles are installed and capable.

A tool that is present but crippled passes a ``which`` check and fails far away: swaks without
Net::SSLeay has no STARTTLS, and its TLS tests then fail with an unrelated-looking error. These
checks name the missing capability and the package that brings it (``scripts/install-system-deps``
installs them all).
"""

from __future__ import annotations

import glob
import shutil
import subprocess

import pytest


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


def test_swaks_speaks_tls() -> None:
    assert shutil.which("swaks"), "swaks is missing (apt-get install swaks)"
    support = _run("swaks", "--support")
    assert "=== TLS supported" in support, f"swaks has no TLS (apt-get install libnet-ssleay-perl libio-socket-ssl-perl):\n{support}"


@pytest.mark.parametrize(("tool", "argv", "expect"), [
    ("gpg", ["gpg", "--version"], "gpg (GnuPG) 2."),
    ("openssl", ["openssl", "version"], "OpenSSL 3"),
    ("curl", ["curl", "--version"], "curl "),
    ("unzip", ["unzip", "-v"], "UnZip"),
    ("zip", ["zip", "-v"], "Zip"),
    ("neomutt", ["neomutt", "-v"], "NeoMutt"),
    ("mbsync", ["mbsync", "--version"], "isync "),
    ("fetchmail", ["fetchmail", "--version"], "fetchmail release"),
    ("getmail", ["getmail", "--version"], "getmail 6."),
    ("postfix", ["/usr/sbin/postconf", "-d", "mail_version"], "mail_version = 3."),
])
def test_oracle_tool_present(tool: str, argv: list[str], expect: str) -> None:
    assert shutil.which(tool), f"{tool} is missing (scripts/install-system-deps installs it)"
    assert expect in _run(*argv)


def test_openssl_cms_available() -> None:
    assert "Usage: cms" in _run("openssl", "cms", "-help") or "cms" in _run("openssl", "list", "-commands")


def test_postgresql_server_binaries_present() -> None:
    assert glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"), \
        "PostgreSQL server is missing (apt-get install postgresql)"


def test_pg_throwaway_removes_only_folders_it_made(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``scripts/pg-throwaway`` removes its folder at start and stop: never one it did not make."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "pg-throwaway"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("data")
    for argv in (["stop", str(precious)], ["start", str(precious)], ["stop", "/"], ["stop", "/tmp"], ["stop"]):
        done = subprocess.run(["bash", str(script), *argv], capture_output=True, text=True, check=False)
        assert done.returncode == 2, (argv, done.stderr)
        assert "pg-throwaway:" in done.stderr
    assert (precious / "keep").read_text() == "data"
