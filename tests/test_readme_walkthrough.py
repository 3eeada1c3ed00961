"""README "Two operators in five minutes", executed literally: the walk-through cannot drift from the code.

The test reads the ``sh`` blocks of that section, swaps the documented port numbers (1xxx for A,
2xxx for B) for free loopback ports so it can run beside other tests, and runs them as one bash
script with ``set -euo pipefail`` and the virtualenv's ``mssgw`` first on PATH. Both gateways are
real ``mssgw serve`` processes that keep running while the peers are added (live reload), swaks
submits with certificate verification, curl reads both mailboxes over IMAPS with verification.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Two operators in five minutes"
PORTS = ("1587", "1025", "1993", "2587", "2025", "2993")


def walkthrough_script() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) >= 5, "the walk-through lost its command blocks"
    return "\n".join(blocks)


def _free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


@pytest.mark.timeout(900)  # some twenty CLI start-ups and two gateways: minutes on a loaded machine
def test_readme_two_operators_walkthrough_runs(tmp_path: Path) -> None:
    for tool in ("swaks", "curl", "timeout"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-system-deps)")
    script = walkthrough_script()
    for documented, free in zip(PORTS, _free_ports(len(PORTS)), strict=True):
        script = re.sub(rf"(?<!\d){documented}(?!\d)", str(free), script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSGW_")}  # each home its own SQLite
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    output = tmp_path / "walkthrough.out"
    with output.open("wb") as sink:  # a file, not a pipe: the gateways in the background inherit it
        proc = subprocess.Popen(["bash", "-xc", "set -euo pipefail\n" + script], cwd=tmp_path, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=840)
    finally:
        if proc.poll() is None:
            proc.kill()
        # A failed step leaves its gateways running in the script's process group: stop them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("op-*/serve.log")))
    assert proc.returncode == 0, output.read_text(errors="replace")[-4000:] + logs
    # What each step was for, checked on its output (not only on exit statuses).
    paul = (tmp_path / "paul.eml").read_bytes()
    assert b"Amoxicilline 1 g" in paul and b"smime=pass" in paul
    anne = (tmp_path / "anne.eml").read_text(errors="replace")
    assert re.search(r"Disposition: .*processed", anne, flags=re.I)
    for log in tmp_path.glob("op-*/serve.log"):
        text = log.read_text()
        assert "trust reloaded" in text and "Traceback" not in text
        assert "Amoxicilline" not in text  # no health content in logs
