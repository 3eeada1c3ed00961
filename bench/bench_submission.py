"""Submission throughput and DATA->250 latency of ``mssgw serve`` beside a bare aiosmtpd server.

Both servers run as separate processes; this process is the load generator
(aiosmtplib, 20 concurrent sessions, 20 KB messages). Two modes: connections reused
(one STARTTLS + AUTH per session) and a new connection per message (STARTTLS + AUTH
each time). The gateway's figures are for messages durably queued (fsync of spool
file and directory, database commit with audit records); the bare server answers 250
without storing. Compare the ratio, not absolute numbers (PERFORMANCE.md).

    .venv/bin/python bench/bench_submission.py [--messages 1500] [--concurrency 20] [--size 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench password 1234"
DOMAIN = "a.mssante.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(size: int, n: int) -> bytes:
    head = (f"From: sec@{DOMAIN}\r\nTo: bob@{DOMAIN}\r\nSubject: bench {n}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
            f"Message-ID: <{n}.{time.time_ns()}@bench>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    line = "x" * 76 + "\r\n"
    return (head + line * max(1, (size - len(head)) // len(line))).encode()


def bare_server(port: int) -> None:
    """A bare aiosmtpd handler answering 250 (the anchor of PERFORMANCE.md)."""
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Handler(), hostname="bench", loop=loop), "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def setup_home(base: Path) -> tuple[Path, int]:
    sys.path.insert(0, str(ROOT))
    from directory import admin
    from directory.db import make_engine, session_factory, transaction
    from gateway.config import render_toml
    from gateway.operator import init_operator

    home = base / "home"
    init_operator(home, domain=DOMAIN, hostname="localhost")
    port = free_port()
    import tomllib

    raw = tomllib.loads((home / "mssgw.toml").read_text())
    raw["listen"].update({"submission": f"127.0.0.1:{port}", "submissions": "", "inbound": "", "imap": "",
                          "imaps": "", "metrics": "", "api": ""})
    (home / "mssgw.toml").write_text(render_toml(raw))
    engine = make_engine(f"sqlite:///{home / 'mssgw.db'}")
    with transaction(session_factory(engine)) as db:
        admin.add_mailbox(db, f"sec@{DOMAIN}", type="ORG", display_name="Bench", password=PASSWORD)
        admin.add_mailbox(db, f"bob@{DOMAIN}", type="ORG", display_name="Bob")
    engine.dispose()
    return home, port


async def run_load(port: int, *, tls: ssl.SSLContext | None, reuse: bool, total: int, concurrency: int,
                   size: int) -> tuple[float, list[float]]:
    import aiosmtplib

    latencies: list[float] = []
    counter = iter(range(total))
    payloads = [message(size, n) for n in range(64)]

    async def session() -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=tls, timeout=60)
        await smtp.connect()
        if tls is not None:
            await smtp.starttls(server_hostname="localhost")
            await smtp.login(f"sec@{DOMAIN}", PASSWORD)
        return smtp

    async def worker() -> None:
        smtp = await session() if reuse else None
        for n in counter:
            if smtp is None:
                smtp = await session()
            await smtp.mail(f"sec@{DOMAIN}")
            await smtp.rcpt(f"bob@{DOMAIN}")
            start = time.perf_counter()
            await smtp.data(payloads[n % len(payloads)])
            latencies.append(time.perf_counter() - start)
            if not reuse:
                await smtp.quit()
                smtp = None
        if smtp is not None:
            await smtp.quit()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start), latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else 0.0


def start_process(args: list[str], ready: str, log: Path) -> subprocess.Popen[str]:
    """Start a server and wait until it prints ``ready`` in its log."""
    out = log.open("w")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    with log.open() as follow:
        while True:
            line = follow.readline()
            if ready in line and line:
                return proc
            if not line:
                if proc.poll() is not None:
                    raise SystemExit(f"server did not start: {' '.join(args)}: {log.read_text()[-500:]}")
                time.sleep(0.05)  # tailing a file another process writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--new-conn-messages", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server)
        return
    with tempfile.TemporaryDirectory(prefix="mssgw-bench-") as tmp:
        home, gw_port = setup_home(Path(tmp))
        bare_port = free_port()
        bare = start_process([sys.executable, __file__, "--bare-server", str(bare_port)], "ready",
                             Path(tmp) / "bare.log")
        gateway = start_process([sys.executable, "-m", "cli.main", "--data-dir", str(home), "serve", "--no-workers"],
                                "gateway started", Path(tmp) / "serve.log")
        tls = ssl.create_default_context(cafile=str(home / "pki" / "ca.pem"))
        try:
            print(f"{args.size} B messages, {args.concurrency} concurrent sessions, loopback, 2-core VM")
            print(f"{'server':<34}{'mode':<12}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
            rows = {}
            for name, port, ctx in (("bare aiosmtpd (250, no storage)", bare_port, None),
                                    ("mssgw (TLS+AUTH, durably queued)", gw_port, tls)):
                for reuse in (True, False):
                    total = args.messages if reuse else args.new_conn_messages
                    rate, lat = asyncio.run(run_load(port, tls=ctx, reuse=reuse, total=total,
                                                     concurrency=args.concurrency, size=args.size))
                    mode = "reuse" if reuse else "new-conn"
                    rows[(name, mode)] = rate
                    print(f"{name:<34}{mode:<12}{rate:>8.0f}{pct(lat, 50):>9.1f}{pct(lat, 99):>9.1f}")
            for mode in ("reuse", "new-conn"):
                gw = rows[("mssgw (TLS+AUTH, durably queued)", mode)]
                base = rows[("bare aiosmtpd (250, no storage)", mode)]
                print(f"ratio mssgw/bare ({mode}): {gw / base:.2f}")
        finally:
            for proc in (gateway, bare):
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
