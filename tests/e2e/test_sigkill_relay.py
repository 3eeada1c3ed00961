"""Kill -9 of operator A while it relays to B, restart: every message reaches B exactly once.

Both operators run as real ``mssgw serve`` processes. A's queue holds N prescriptions
before it starts; once B has received a few, A is killed with SIGKILL (claims, pooled
connections and half-done transactions die with it), then started again. A's workers take
the abandoned claims back when their lease expires and resend; B acknowledges the resent
copies without queueing them twice (dedupe by peer and Message-ID). A's crypto processes
do not outlive it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from email import message_from_bytes
from pathlib import Path

from e2e_support import (
    A_DOMAIN,
    B_DOMAIN,
    CLINICIAN,
    PRACTITIONER,
    Template,
    _settings_overrides,
    free_port,
    prescription,
)

from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.config import CONFIG_NAME, load_settings, render_toml
from gateway.delivery.maildir import MaildirDelivery
from gateway.queue.store import QueueStore

N = 80


def _serve(home: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSGW_")}
    env["MSSGW_HOME"] = str(home)
    with (home / "serve.log").open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen([str(Path(sys.executable).parent / "mssgw"), "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


async def _until(predicate, what: str, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (a directory or a port) until it holds: the event we wait on is outside this process."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """Live child processes of ``pid`` and theirs (Linux /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_sigkill_while_relaying_then_restart_delivers_each_message_once(
    templates: dict[str, Template], tmp_path: Path
) -> None:
    homes = {name: tmp_path / name for name in ("a", "b")}
    ports = {name: {"submission": free_port(), "inbound": free_port()} for name in homes}
    for name, peer, peer_domain in (("a", "b", B_DOMAIN), ("b", "a", A_DOMAIN)):
        t = templates[name]
        shutil.copytree(t.home, homes[name])
        overrides = _settings_overrides(t.domain, t.hostname, ports[name], str(homes[name] / "pki" / "clients.pem"))
        overrides["queue"] = {"lease_seconds": 2.0, "retry_base_seconds": 0.5, "retry_max_seconds": 1.0}
        (homes[name] / CONFIG_NAME).write_text(render_toml(overrides), encoding="utf-8")
        settings = load_settings(homes[name])
        engine = make_engine(settings.database_url)
        with transaction(session_factory(engine)) as s:
            admin.trust_domain(s, peer_domain, relay=f"127.0.0.1:{ports[peer]['inbound']}",
                               operator_dn=templates[peer].operator_dn)
        engine.dispose()

    a_settings = load_settings(homes["a"])
    engine = make_engine(a_settings.database_url)
    store = QueueStore(session_factory(engine), a_settings.spool_dir)
    expected = {f"<kill-{i}@{A_DOMAIN}>" for i in range(N)}
    for message_id in sorted(expected):
        store.enqueue(prescription(mdn=False, message_id=message_id), sender=CLINICIAN, recipients=[PRACTITIONER],
                      origin="submission", auth_identity=CLINICIAN)
    engine.dispose()

    inbox = MaildirDelivery(load_settings(homes["b"]).mail_dir).folder_path(PRACTITIONER, "INBOX")

    def delivered() -> list[Path]:
        return [*inbox.glob("new/*"), *inbox.glob("cur/*")] if inbox.exists() else []

    b = _serve(homes["b"])
    a = _serve(homes["a"])
    try:
        await _until(lambda: _listening(ports["b"]["inbound"]), "B listening")
        await _until(lambda: len(delivered()) >= 3, "B received the first messages")
        crypto = _descendants(a.pid)
        assert crypto, "A relays signed and encrypted mail: its crypto processes should be running"
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        at_kill = len(delivered())
        # The crypto processes go with A (they watch their parent), so none is left behind.
        await _until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in crypto),
                     "A's crypto processes exit after A was killed", timeout=30)
        assert at_kill < N, "A finished before it could be killed; raise N"
        a = _serve(homes["a"])
        await _until(lambda: len(delivered()) >= N, "every message at B after A's restart")
        # A records every recipient delivered (what B answered), and nothing more arrives.
        def a_done() -> bool:
            engine = make_engine(a_settings.database_url)
            try:
                rows = QueueStore(session_factory(engine), a_settings.spool_dir).list(include_done=True, limit=1000)
            finally:
                engine.dispose()
            return len(rows) == N and all(r["state"] == "done" for r in rows)

        await _until(a_done, "A's queue drained")
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    files = delivered()
    ids = [str(message_from_bytes(p.read_bytes())["Message-ID"]) for p in files]
    assert sorted(ids) == sorted(expected), f"{len(ids)} delivered for {N} sent"
