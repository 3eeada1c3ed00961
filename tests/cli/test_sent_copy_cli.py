"""``mssgw directory sent-copy``: whether the gateway files a Sent copy for one mailbox."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result

from cli.main import cli


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--data-dir", str(home), *args])


def setting(home: Path, address: str) -> str:
    shown = run(home, "directory", "show", address, "--json")
    assert shown.exit_code == 0, shown.output
    return str(json.loads(shown.stdout)["sent_copy"])


def test_sent_copy_on_off_default_and_refusals(sqlite_home: Path) -> None:
    home = sqlite_home
    address = "secretariat@a.mssante.test"
    assert run(home, "directory", "add-mailbox", address, "--type", "ORG").exit_code == 0
    assert setting(home, address) == "default"
    for choice in ("on", "OFF", "default"):
        r = run(home, "directory", "sent-copy", address.upper(), choice)
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == f"Sent copy of {address}: {choice.lower()}"
        assert setting(home, address) == choice.lower()
    unknown = run(home, "directory", "sent-copy", "nobody@a.mssante.test", "on")
    assert unknown.exit_code != 0 and "Traceback" not in unknown.output
    assert len(unknown.stderr.strip().splitlines()) == 1 and "nobody@a.mssante.test" in unknown.stderr
    bad = run(home, "directory", "sent-copy", address, "sometimes")
    assert bad.exit_code == 2 and "sometimes" in bad.stderr
