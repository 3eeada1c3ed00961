"""API submission against SMTP submission of the same messages, in the same run of ``mssgw serve``.

One gateway process (``serve --no-workers``: messages are durably queued, not delivered) with
the submission listener (STARTTLS) and the API (``listen.api``). Both clients log in with the same
TLS client certificate of an APP mailbox and send the same messages (the API's JSON, and for SMTP
the MIME the API builds from it: ``gateway.api.schemas.build_message``), over reused connections
(SMTP sessions; HTTP/1.1 keep-alive), ``--concurrency`` at a time. Latency: SMTP from DATA to
the 250, API from the request to the 202; both answer only once the message is committed. The
target of issue 17 is API throughput >= 0.8 x SMTP's.

    .venv/bin/python bench/bench_api.py [--messages 1000] [--concurrency 20] [--size 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "a.mssante.test"
APP = f"app@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
PASSWORD = "bench password 1234"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_home(base: Path) -> tuple[Path, int, int, Path, Path]:
    sys.path.insert(0, str(ROOT))
    import tomllib

    from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
    from directory import admin
    from directory.certificates import register_certificate
    from directory.db import make_engine, session_factory, transaction
    from gateway.config import render_toml
    from gateway.operator import init_operator

    home = base / "home"
    init_operator(home, domain=DOMAIN, hostname="localhost")
    smtp_port, api_port = free_port(), free_port()
    raw = tomllib.loads((home / "mssgw.toml").read_text())
    raw["listen"].update({"submission": f"127.0.0.1:{smtp_port}", "submissions": "", "inbound": "", "imap": "",
                          "imaps": "", "metrics": "", "api": f"127.0.0.1:{api_port}"})
    raw.setdefault("api", {}).update({"burst": 1_000_000, "rate_per_minute": 1_000_000})
    raw.setdefault("tls", {})["request_client_cert"] = ["submission", "api"]  # software logs in by certificate
    (home / "mssgw.toml").write_text(render_toml(raw))
    cert, key = issue_certificate(load_dev_pki(home / "pki"), kind="app", email=APP)
    cert_path, key_path = base / "app.pem", base / "app.key"
    save_certificate_and_key(cert, key, cert_path, key_path)
    engine = make_engine(f"sqlite:///{home / 'mssgw.db'}")
    with transaction(session_factory(engine)) as db:
        admin.add_mailbox(db, APP, type="APP", display_name="Bench software", password=PASSWORD)
        admin.add_mailbox(db, BOB, type="ORG", display_name="Bob")
        register_certificate(db, cert_path.read_bytes(), address=APP, purpose="tls-client")
    engine.dispose()
    return home, smtp_port, api_port, cert_path, key_path


def request_body(size: int, n: int) -> dict[str, Any]:
    text = ("x" * 76 + "\n") * max(1, size // 77)
    return {"from": APP, "to": [BOB], "subject": f"bench {n}", "text": text,
            "attachments": [{"filename": "r.pdf", "content_type": "application/pdf",
                             "content": base64.b64encode(b"%PDF-1.4\n" + bytes(n % 256 for _ in range(512))).decode()}]}


def mime_of(body: dict[str, Any]) -> bytes:
    from gateway.api.schemas import build_message, parse_submission

    return build_message(parse_submission(body))


async def smtp_load(port: int, tls: ssl.SSLContext, messages: list[bytes], concurrency: int,
                    login: str = "certificate") -> tuple[float, list[float]]:
    import aiosmtplib

    latencies: list[float] = []
    counter = iter(range(len(messages)))

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=tls, timeout=60)
        await smtp.connect()
        await smtp.starttls(server_hostname="localhost")
        if login == "password":
            await smtp.login(APP, PASSWORD)
        for n in counter:
            await smtp.mail(APP)
            await smtp.rcpt(BOB)
            start = time.perf_counter()
            await smtp.data(messages[n])
            latencies.append(time.perf_counter() - start)
        await smtp.quit()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(messages) / (time.perf_counter() - start), latencies


async def api_load(port: int, tls: ssl.SSLContext, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    import aiohttp

    latencies: list[float] = []
    counter = iter(range(len(bodies)))
    connector = aiohttp.TCPConnector(ssl=tls, limit=concurrency, resolver=None)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            for n in counter:
                start = time.perf_counter()
                async with http.post(f"https://localhost:{port}/v1/messages", data=bodies[n],
                                     headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status != 202:
                        raise SystemExit(f"API answered {response.status}")
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - start), latencies


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else 0.0


def start_gateway(home: Path, log: Path) -> subprocess.Popen[str]:
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--data-dir", str(home), "serve", "--no-workers"],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})  # fmt: skip
    with log.open() as follow:
        while True:
            line = follow.readline()
            if "gateway started" in line:
                return proc
            if not line:
                if proc.poll() is not None:
                    raise SystemExit(f"mssgw serve did not start: {log.read_text()[-800:]}")
                time.sleep(0.05)  # tailing a file another process writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2, help="alternate SMTP and API this many times")
    parser.add_argument("--smtp-login", choices=["certificate", "password"], default="certificate",
                        help="how the SMTP client logs in (AUTH PLAIN once per session with password)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mssgw-bench-api-") as tmp:
        home, smtp_port, api_port, cert, key = setup_home(Path(tmp))
        bodies = [request_body(args.size, n) for n in range(args.messages)]
        mime = [mime_of(b) for b in bodies]
        encoded = [json.dumps(b).encode() for b in bodies]
        tls = ssl.create_default_context(cafile=str(home / "pki" / "ca.pem"))
        tls.load_cert_chain(cert, key)
        gateway = start_gateway(home, Path(tmp) / "serve.log")
        try:
            print(f"{len(mime[0])} B messages ({len(encoded[0])} B of JSON), {args.concurrency} concurrent, "
                  f"SMTP login by {args.smtp_login}, API by client certificate, loopback, one serve process")
            print(f"{'edge':<10}{'round':>6}{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
            totals: dict[str, list[float]] = {"smtp": [], "api": []}
            for round_no in range(1, args.rounds + 1):
                for edge in ("smtp", "api"):
                    if edge == "smtp":
                        rate, lat = asyncio.run(smtp_load(smtp_port, tls, mime, args.concurrency, args.smtp_login))
                    else:
                        rate, lat = asyncio.run(api_load(api_port, tls, encoded, args.concurrency))
                    totals[edge].append(rate)
                    print(f"{edge:<10}{round_no:>6}{rate:>9.0f}{pct(lat, 50):>9.1f}{pct(lat, 99):>9.1f}")
            ratio = statistics.mean(totals["api"]) / statistics.mean(totals["smtp"])
            print(f"ratio api/smtp (throughput, mean of rounds): {ratio:.2f} (target >= 0.8)")
        finally:
            gateway.terminate()
            gateway.wait(timeout=60)


if __name__ == "__main__":
    main()
