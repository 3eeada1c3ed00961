"""``mssgw init``: the home folder, its modes, idempotence, and the CLI's error contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cli.main import cli, hoist_data_dir


def test_init_creates_home_with_private_modes(tmp_path: Path) -> None:
    home = tmp_path / "op"
    result = CliRunner().invoke(cli, ["init", "--data-dir", str(home), "--domain", "x.mssante.test"])
    assert result.exit_code == 0, result.output
    assert (home / "mssgw.toml").stat().st_mode & 0o777 == 0o600
    for key in ("ca.key", "server.key", "operator.key"):
        assert (home / "pki" / key).stat().st_mode & 0o777 == 0o600
    for folder in ("mail", "spool", "keys", "gnupg"):
        assert (home / folder).stat().st_mode & 0o777 == 0o700
    assert 'domains = ["x.mssante.test"]' in (home / "mssgw.toml").read_text()
    listing = CliRunner().invoke(cli, ["--data-dir", str(home), "domains", "list", "--kind", "local", "--json"])
    assert '"x.mssante.test"' in listing.stdout
    # The patient-pseudonym salt is sealed from the first day: a gateway never finds it missing
    # unless its row was deleted (and then says so).
    from directory import secrets
    from directory.db import make_engine, session_factory
    from gateway.config import load_settings

    engine = make_engine(load_settings(home).database_url)
    try:
        with session_factory(engine)() as session:
            assert secrets.exists(session, secrets.SALT_NAME)
    finally:
        engine.dispose()


def test_init_is_idempotent_and_keeps_keys(tmp_path: Path) -> None:
    home = tmp_path / "op"
    CliRunner().invoke(cli, ["--data-dir", str(home), "init"])
    key = (home / "pki" / "ca.key").read_bytes()
    second = CliRunner().invoke(cli, ["--data-dir", str(home), "init"])
    assert second.exit_code == 0 and "kept" in second.stdout
    assert (home / "pki" / "ca.key").read_bytes() == key
    # On a database that holds the operator, --force re-issues this node's listener certificate
    # only: a new CA or operator key would be one no peer knows.
    server, ca = (home / "pki" / "server.pem").read_bytes(), (home / "pki" / "ca.pem").read_bytes()
    forced = CliRunner().invoke(cli, ["--data-dir", str(home), "init", "--force"])
    assert forced.exit_code == 0 and "joined operator a.mssante.test" in forced.stdout, forced.output
    assert (home / "pki" / "ca.pem").read_bytes() == ca and (home / "pki" / "ca.key").read_bytes() == key
    assert (home / "pki" / "server.pem").read_bytes() != server


def test_data_dir_anywhere_and_env(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert hoist_data_dir(["domains", "list", "--data-dir", "X"]) == ["--data-dir", "X", "domains", "list"]
    assert hoist_data_dir(["a", "--data-dir=Y"]) == ["--data-dir=Y", "a"]
    home = tmp_path / "op"
    monkeypatch.setenv("MSSGW_HOME", str(home))
    assert CliRunner().invoke(cli, ["init"]).exit_code == 0
    assert (home / "mssgw.toml").exists()


def test_uninitialised_home_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "none"), "directory", "list"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no mssgw.toml") and "mssgw init" in result.stderr
    assert "Traceback" not in result.output


def test_installed_console_script_runs(tmp_path: Path) -> None:
    """The ``mssgw`` console script of the package, as an admin runs it."""
    script = Path(sys.executable).parent / "mssgw"
    home = tmp_path / "op"
    done = subprocess.run([str(script), "init", "--data-dir", str(home)], capture_output=True, text=True,
                          env={**os.environ, "MSSGW_DATABASE_URL": ""})
    assert done.returncode == 0, done.stderr
    check = subprocess.run([str(script), "domains", "check", "dr@gmail.com", "--data-dir", str(home)],
                           capture_output=True, text=True, env={**os.environ, "MSSGW_DATABASE_URL": ""})
    assert check.returncode == 1
    assert "consumer mailbox: health data may not be sent to gmail.com" in check.stdout


def test_a_refused_first_init_leaves_no_key_file(tmp_path: Path) -> None:
    """The key-encryption key is checked before the development PKI is made: a malformed one stops
    init with one sentence, and no private key (nor mssgw.toml) is left in clear in the home."""
    home = tmp_path / "op"
    result = CliRunner().invoke(cli, ["--data-dir", str(home), "init"], env={"MSSGW_KEK": "not-a-key",
                                                                            "MSSGW_DATABASE_URL": ""})
    assert result.exit_code != 0 and "key-encryption key" in result.output and "Traceback" not in result.output
    files = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in files), files
    assert not (home / "mssgw.toml").exists() and not (home / "pki").exists()
