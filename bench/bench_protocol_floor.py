"""Protocol floor: bare aiosmtpd + aiosmtplib relaying A -> B over STARTTLS, no crypto, no database, no disk.

What it measures: the cheapest a two-hop Python SMTP relay chain over TLS can be on this machine.
Three OS processes, as with the real gateways:

    bench (load generator)  --STARTTLS-->  A (aiosmtpd)  --STARTTLS, pooled-->  B (aiosmtpd)

* the bench process runs ``submitters`` aiosmtplib sessions (default 20), each STARTTLS once, no
  AUTH, connection reused for every message; 20 KB messages built like ``bench_e2e.message()``;
* A is an aiosmtpd server with ``require_starttls=True`` whose ``handle_DATA`` forwards the bytes
  through a pool of at most 8 persistent aiosmtplib connections to B (STARTTLS, reused, one
  transaction at a time per connection) and answers 250 only once B has answered 250;
* B is an aiosmtpd server with ``require_starttls=True`` whose ``handle_DATA`` counts and answers
  ``250 OK``.  Since A only accepts after B accepted, every message has reached B when every
  submitter's ``sendmail`` has returned; B prints its count on exit and the bench checks it.

A and B run on uvloop when it is installed (as ``mssgw serve`` does), else on asyncio's loop,
and do STARTTLS as mssgw's listeners do (``gateway.smtp.starttls.LoopTlsSMTP``: the loop's TLS,
not aiosmtpd's pure-Python SSLProtocol): the floor is the cheapest this stack can be.

Why: any gateway built on aiosmtpd/aiosmtplib that also signs, encrypts, queues durably and
delivers does strictly more work per message than this, so it cannot be faster.  Run it beside
``bench_e2e.py`` (same machine, same run) and read the e2e figures against this floor: the gap
is what our own code costs, the floor is what the protocol stack costs.

TLS: one throwaway certificate for ``127.0.0.1`` and ``localhost`` from a trustme CA, in a
temporary directory, served by both A and B; clients (the bench and A's pool) use
``ssl.create_default_context(cafile=that chain)``, so the certificate and the host name are
really verified.  No client certificate (the real A -> B hop
is mutual TLS, which only changes the handshake, and handshakes happen only during warm-up here).
TLS 1.3 and cipher suites are OpenSSL's defaults.

Measured phase: every session first connects, does STARTTLS and sends ``WARMUP`` (3) messages (A's
pool fills up to 8 connections to B); then CPU counters are read, all sessions send their share
of ``--messages`` on the same connections, counters are read again; QUIT happens afterwards.
Unlike ``bench_e2e.py`` the session set-up (20 TLS handshakes, no AUTH here) is therefore outside
the measured phase.  Latency is ``sendmail`` start -> return, as the submitter sees it.  CPU is
user + system from ``/proc/PID/stat`` for A and B (all threads), ``os.times()`` for the bench.

    .venv/bin/python bench/bench_protocol_floor.py [--messages N] [--submitters 20] [--size 20000]

From another bench: ``from bench_protocol_floor import run_floor; run_floor(400, 20, 20_000)``
(synchronous, call it outside a running event loop; ``floor()`` is the coroutine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import ssl
import statistics
import subprocess  # nosec B404 - starts this same file as A and B
import sys
import tempfile
import time
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.smtp.starttls import LoopTlsSMTP  # the same STARTTLS as mssgw listeners

SENDER = "clinician@a.example"
RECIPIENT = "practitioner@b.example"
POOL_SIZE = 8
WARMUP = 3


def message(size: int, sender: str, to: str) -> tuple[bytes, str]:
    """A plain-text message of ``size`` bytes (headers, then repeated text lines), and its Message-ID."""
    msgid = make_msgid(domain=sender.rpartition("@")[2])
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: bench\r\nMessage-ID: {msgid}\r\n"
            "Date: Tue, 03 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode()  # fmt: skip
    line = b"Compte rendu de consultation, ligne de texte pour le benchmark.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body, msgid


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway CA (trustme) and a certificate for 127.0.0.1/localhost: (chain with the CA, key).

    The chain file serves both sides: the servers load it as their chain, the clients trust the
    CA in it.
    """
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems) + ca.cert_pem.bytes())
    leaf.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


# --- A and B (run as `bench_protocol_floor.py --role a|b ...`) -------------------------------------


class Relay:
    """A's pool of persistent STARTTLS connections to B, one transaction at a time on each."""

    def __init__(self, port: int, tls: ssl.SSLContext, size: int) -> None:
        self.port = port
        self.tls = tls
        self.slots = asyncio.Semaphore(size)
        self.idle: list[aiosmtplib.SMTP] = []

    async def send(self, sender: str, recipients: list[str], data: bytes) -> None:
        async with self.slots:
            client = self.idle.pop() if self.idle else None
            try:
                if client is None:
                    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, local_hostname="a.localhost",
                                             start_tls=True, tls_context=self.tls, timeout=60)  # fmt: skip
                    await client.connect()
                await client.sendmail(sender, recipients, data)
            except BaseException:
                if client is not None:
                    client.close()
                raise
            self.idle.append(client)

    async def close(self) -> None:
        for client in self.idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 5)
        self.idle.clear()


class ForwardHandler:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        try:
            await self.relay.send(envelope.mail_from or "", list(envelope.rcpt_tos), data)
        except Exception as exc:  # the submitter sees the failure; the bench then fails
            return f"451 4.4.1 relay to B failed: {type(exc).__name__}: {exc}"
        return "250 2.0.0 OK relayed"


class CountHandler:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        return "250 2.0.0 OK"


async def serve(args: argparse.Namespace) -> int:
    """Listen on 127.0.0.1:port until SIGTERM or until the bench closes our stdin; print B's count."""
    loop = asyncio.get_running_loop()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    relay = Relay(args.next_port, client_context(Path(args.cert)), POOL_SIZE) if args.role == "a" else None
    handler: ForwardHandler | CountHandler = ForwardHandler(relay) if relay else CountHandler()

    def factory() -> SMTP:
        return LoopTlsSMTP(handler, hostname=f"{args.role}.localhost", ident="floor ESMTP", decode_data=False,
                    tls_context=tls, require_starttls=True, timeout=120, loop=loop)  # fmt: skip

    server = await loop.create_server(factory, "127.0.0.1", args.port, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_stdin() -> None:  # the bench died without SIGTERM: do not linger
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_stdin)
    await stop.wait()
    server.close()
    if relay:
        await relay.close()
    if isinstance(handler, CountHandler):
        print(handler.count, flush=True)
    return 0


# --- the bench --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads, live or exited); Linux /proc, else 0."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def start_server(role: str, port: int, next_port: int, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--port", str(port),
               "--next-port", str(next_port), "--cert", str(cert), "--key", str(key)]  # fmt: skip
    return subprocess.Popen(command, stdin=subprocess.PIPE,  # nosec B603
                            stdout=subprocess.PIPE if role == "b" else subprocess.DEVNULL)  # fmt: skip


def stop_server(proc: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM, then kill after 10 s; returns what the process printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or b""


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server for port {port} exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listens on {port} after {timeout:.0f} s")


async def load(port: int, tls: ssl.SSLContext, messages: int, submitters: int, size: int,
               pids: dict[str, int]) -> dict[str, float]:  # fmt: skip
    async def open_session() -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.localhost",
                                 start_tls=True, tls_context=tls, timeout=60)  # fmt: skip
        await client.connect()
        for _ in range(WARMUP):
            data, _ = message(size, SENDER, RECIPIENT)
            await client.sendmail(SENDER, [RECIPIENT], data)
        return client

    async def submit(client: aiosmtplib.SMTP, count: int, latencies: list[float]) -> None:
        for _ in range(count):
            data, _ = message(size, SENDER, RECIPIENT)
            start = time.perf_counter()
            await client.sendmail(SENDER, [RECIPIENT], data)
            latencies.append(time.perf_counter() - start)

    clients: list[aiosmtplib.SMTP] = []
    try:
        clients = list(await asyncio.gather(*(open_session() for _ in range(submitters))))
        per = [messages // submitters + (1 if i < messages % submitters else 0) for i in range(submitters)]
        latencies: list[float] = []
        cpu0 = {name: _proc_cpu(pid) for name, pid in pids.items()}
        client0 = _self_cpu()
        t0 = time.perf_counter()
        await asyncio.gather(*(submit(c, n, latencies) for c, n in zip(clients, per, strict=True) if n))
        elapsed = time.perf_counter() - t0
        client_cpu = _self_cpu() - client0
        cpu = {name: _proc_cpu(pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 5)
    latencies.sort()
    done = len(latencies)
    return {
        "floor_msgs_per_s": done / elapsed,
        "floor_p50_ms": 1000 * statistics.median(latencies),
        "floor_p99_ms": 1000 * latencies[min(done - 1, int(0.99 * done))],
        "floor_cpu_ms_a": 1000 * cpu["a"] / done,
        "floor_cpu_ms_b": 1000 * cpu["b"] / done,
        "floor_cpu_ms_client": 1000 * client_cpu / done,
        "floor_messages": float(done),
        "floor_seconds": elapsed,
    }


async def floor(messages: int = 400, submitters: int = 20, size: int = 20_000) -> dict[str, float]:
    """The coroutine behind ``run_floor``: starts A and B, loads them, stops them (even on error)."""
    if messages < 1 or submitters < 1:
        raise ValueError("need at least one message and one submitter")
    with tempfile.TemporaryDirectory(prefix="mssgw-floor-") as tmp:
        cert, key = make_certificate(Path(tmp))
        port_a, port_b = free_port(), free_port()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        out_b = b""
        try:
            procs["b"] = start_server("b", port_b, 0, cert, key)
            procs["a"] = start_server("a", port_a, port_b, cert, key)
            await asyncio.gather(wait_listening(port_b, procs["b"]), wait_listening(port_a, procs["a"]))
            result = await load(port_a, client_context(cert), messages, submitters, size,
                                {name: proc.pid for name, proc in procs.items()})  # fmt: skip
        finally:
            for name in ("a", "b"):  # A first: it closes its pool to B cleanly
                if name in procs:
                    out = stop_server(procs[name])
                    out_b = out if name == "b" else out_b
    expected = messages + WARMUP * submitters
    received = int(out_b.strip() or -1)
    if received != expected:
        raise RuntimeError(f"B received {received} messages, expected {expected}")
    return result


def run_server(args: argparse.Namespace) -> int:
    """A or B on uvloop when installed, as ``mssgw serve`` runs: the floor is the cheapest stack we could use."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(args))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args))


def run_floor(messages: int = 400, submitters: int = 20, size: int = 20_000) -> dict[str, float]:
    """Protocol-floor figures (see the module docstring); call it outside a running event loop."""
    return asyncio.run(floor(messages, submitters, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--submitters", type=int, default=20)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--role", choices=["a", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--next-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        sys.exit(run_server(args))

    res = run_floor(args.messages, args.submitters, args.size)
    cores = os.cpu_count() or 1
    total = res["floor_cpu_ms_a"] + res["floor_cpu_ms_b"] + res["floor_cpu_ms_client"]
    print(f"protocol floor bench->A->B ({args.messages} x {args.size // 1000} KB, {args.submitters} submitters, "
          f"{cores} cores, STARTTLS on both hops, A->B pool of {POOL_SIZE}, no crypto/db/disk)")  # fmt: skip
    print(f"  throughput         {res['floor_msgs_per_s']:8.1f} msg/s  ({res['floor_seconds']:.2f} s measured)")  # fmt: skip
    print(f"  latency p50 / p99  {res['floor_p50_ms']:8.1f} ms / {res['floor_p99_ms']:.1f} ms")
    print(f"  CPU per message    A {res['floor_cpu_ms_a']:.2f} ms, B {res['floor_cpu_ms_b']:.2f} ms, "
          f"bench {res['floor_cpu_ms_client']:.2f} ms (total {total:.2f} ms)")  # fmt: skip
    print(f"  CPU-bound limit    {1000 * cores / total:8.1f} msg/s  ({cores} cores / total CPU per message)")


if __name__ == "__main__":
    main()
