"""IMAP benchmark: our service against a plain pymap Maildir server, same machine, same run.

Both servers serve a folder of N messages (default 10,000) over STARTTLS with the
same certificate; one imaplib client (in a thread) measures

* the time of ``UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER])`` (a client's first sync),
* messages per second of ``UID FETCH 1:* (BODY.PEEK[])`` (full bodies),

after one untimed SELECT (which assigns the UIDs). The plain server is pymap's own
Maildir backend with its default login (its users file), started the way
``pymap maildir DIR`` does. Prints the figures and the ratio ours/plain.

Usage: ``.venv/bin/python bench/bench_imap.py [--messages 10000] [--size 4096]``
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import os
import shutil
import ssl
import tempfile
import time
from argparse import Namespace
from contextlib import AsyncExitStack
from pathlib import Path

from pymap.backend.maildir import Identity as PymapIdentity
from pymap.backend.maildir import MaildirBackend
from pymap.frozen import frozendict
from pymap.imap import IMAPService
from pymap.user import Passwords, UserMetadata

from directory import admin
from directory.db import make_engine, session_factory, transaction
from gateway.auth import Authenticator
from gateway.config import load_settings
from gateway.delivery.maildir import MaildirDelivery
from gateway.imap.server import start_imap
from gateway.operator import init_operator

USER = "alice@a.mssante.test"
PASSWORD = "benchmark password"


def make_message(n: int, size: int) -> bytes:
    head = (
        f"From: Labo <labo@b.mssante.test>\r\nTo: {USER}\r\nSubject: Compte rendu {n}\r\n"
        f"Message-ID: <{n}@b.mssante.test>\r\nDate: Tue, 02 Jun 2026 10:00:00 +0200\r\n"
        "Authentication-Results: mx.a.mssante.test; smime=pass\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"Resultats: glycemie 5.2 mmol/L, HbA1c 6.1 %, creatinine 80 umol/L.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def fill(folder: Path, count: int, size: int) -> None:
    """Write ``count`` messages into an existing Maildir's new/ (bench setup, no fsync)."""
    for n in range(count):
        (folder / "new" / f"{1_700_000_000 + n}.M{n}P1Q{n}.bench").write_bytes(make_message(n, size))


def measure(port: int, ctx: ssl.SSLContext, user: str, count: int, timeout: float) -> tuple[float, float] | None:
    """(header FETCH seconds, full-body messages/s), or None when a command exceeds ``timeout``."""
    try:
        return _measure(port, ctx, user, count, timeout)
    except TimeoutError:
        return None


def _measure(port: int, ctx: ssl.SSLContext, user: str, count: int, timeout: float) -> tuple[float, float]:
    client = imaplib.IMAP4("localhost", port, timeout=timeout)
    client.starttls(ctx)
    client.login(user, PASSWORD)
    typ, data = client.select("INBOX")
    assert typ == "OK" and data[0] is not None and int(data[0]) == count, data
    start = time.perf_counter()
    typ, headers = client.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER])")
    header_seconds = time.perf_counter() - start
    assert typ == "OK" and sum(isinstance(x, tuple) for x in headers) == count
    start = time.perf_counter()
    typ, bodies = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    body_rate = count / (time.perf_counter() - start)
    assert typ == "OK" and sum(isinstance(x, tuple) for x in bodies) == count
    client.logout()
    return header_seconds, body_rate


async def start_plain_pymap(base: Path, port: int, cert: Path, key: Path, stack: AsyncExitStack) -> None:
    args = Namespace(
        base_dir=str(base), concurrency=None, layout="++", colon=None, host="127.0.0.1", port=str(port),
        debug=False, cert=str(cert), key=str(key), tls=True, passlib_cfg=None, proxy_protocol=None,
        inherited_sockets=None,
    )
    backend, config = await MaildirBackend.init(args)
    config.apply_context()
    hashed = await Passwords(config).hash_password(PASSWORD)
    identity = PymapIdentity(config, backend.login.tokens, "alice", None, {"admin"})
    await identity.set(UserMetadata(config, "alice", password=hashed, params=frozendict({"mailbox_path": "alice"})))
    await backend.start(stack)
    await IMAPService(backend, config).start(stack)


async def main(count: int, size: int, timeout: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    try:
        home = work / "op"
        os.environ["MSSGW_LISTEN_IMAP"] = "127.0.0.1:21143"
        os.environ["MSSGW_LISTEN_IMAPS"] = "127.0.0.1:21993"
        init_operator(home, domain="a.mssante.test", hostname="localhost")
        settings = load_settings(home)
        engine = make_engine(settings.database_url)
        factory = session_factory(engine)
        with transaction(factory) as session:
            admin.add_mailbox(session, USER, type="APP", password=PASSWORD)
        delivery = MaildirDelivery(settings.mail_dir)
        delivery.ensure_folders(USER)
        fill(delivery.mailbox_path(USER), count, size)
        plain_base = work / "pymap"
        (plain_base / "alice").mkdir(parents=True)
        for sub in ("cur", "new", "tmp"):
            (plain_base / "alice" / sub).mkdir()
        fill(plain_base / "alice", count, size)

        ctx = ssl.create_default_context(cafile=str(settings.pki_dir / "ca.pem"))
        async with AsyncExitStack() as stack:
            ours = await start_imap(settings, factory, Authenticator(factory, settings))
            stack.push_async_callback(ours.close)
            await start_plain_pymap(plain_base, 21144, settings.pki_dir / "server.pem",
                                    settings.pki_dir / "server.key", stack)
            our_port = ours.addresses["imap"][1]
            results: dict[str, tuple[float, float] | None] = {}
            for name, port, user in (("mssgw", our_port, USER), ("plain pymap", 21144, "alice")):
                results[name] = await asyncio.to_thread(measure, port, ctx, user, count, timeout)
        engine.dispose()
        print(f"{count} messages of ~{size} bytes in one folder, STARTTLS, one imaplib client")
        print(f"{'server':<12} {'header FETCH 1:* (s)':>22} {'full-body FETCH (msg/s)':>25}")
        for name, result in results.items():
            if result is None:
                print(f"{name:<12} {'> ' + str(int(timeout)) + ' (timed out)':>22} {'-':>25}")
            else:
                print(f"{name:<12} {result[0]:>22.2f} {result[1]:>25.0f}")
        ours_r, plain_r = results["mssgw"], results["plain pymap"]
        if ours_r and plain_r:
            print(f"ratio mssgw/plain: header time x{ours_r[0] / plain_r[0]:.2f}, "
                  f"body throughput x{ours_r[1] / plain_r[1]:.2f}")
        elif ours_r:
            print(f"ratio mssgw/plain: header time < x{ours_r[0] / timeout:.3f} (plain timed out)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=600.0, help="per IMAP command, seconds")
    ns = parser.parse_args()
    asyncio.run(main(ns.messages, ns.size, ns.timeout))
