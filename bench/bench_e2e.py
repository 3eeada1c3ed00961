"""End-to-end throughput A -> B against the crypto-only ceiling, measured in the same run.

Two operators on loopback (the e2e tests' setup: own homes, dev PKIs, trust lists).  20
concurrent submitters log in to A's submission listener (STARTTLS + AUTH, connections reused)
and send 20 KB messages to B's practitioner; each message is queued, signed and encrypted by
A's workers, relayed over mutual TLS to B's inbound listener, queued, decrypted, verified and
delivered to B's Maildir.  Latency is submission start -> delivery at B.  The ceiling is
``protect_job`` + ``open_job`` (the same crypto calls the workers make) in a tight loop on a
process pool with one process per core.  Compare the ratio, not absolute figures across runs
(see /work/shared/PERFORMANCE.md); the target is e2e / ceiling >= 0.5.

    .venv/bin/python bench/bench_e2e.py [--messages N] [--submitters 20] [--size 20000]
                                        [--executor process|thread] [--ceiling-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from email.utils import make_msgid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

PASSWORD = "bench-password-0123456789"


def message(size: int, sender: str, to: str) -> tuple[bytes, str]:
    msgid = make_msgid(domain=sender.rpartition("@")[2])
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: bench\r\nMessage-ID: {msgid}\r\n"
            "Date: Tue, 03 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode()  # fmt: skip
    line = b"Compte rendu de consultation, ligne de texte pour le benchmark.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body, msgid


# --- crypto-only ceiling -------------------------------------------------------------------------


def _ceiling_worker(args: tuple[bytes, object, tuple[bytes, ...], object, object, float]) -> int:
    data, signer, certs, candidates, trust, seconds = args
    from gateway.process.inbound import open_job
    from gateway.process.outbound import protect_job

    done = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        wire = protect_job(data, signer, certs, True, "Message securise")  # type: ignore[arg-type]
        inner, result = open_job(wire, candidates, trust, None)  # type: ignore[arg-type]
        assert inner is not None and result.ok, result.failure
        done += 1
    return done


def crypto_ceiling(a_keys, b_keys, data: bytes, sender: str, rcpt: str, seconds: float, cores: int) -> float:  # type: ignore[no-untyped-def]
    signer = a_keys.signer_for(sender)
    certs = tuple(a_keys.recipient_certs(rcpt))
    candidates = tuple(b_keys.decryption_keys(rcpt))
    trust = b_keys.trust()
    job = (data, signer, certs, candidates, trust, seconds)
    with ProcessPoolExecutor(max_workers=cores) as pool:
        list(pool.map(_ceiling_worker, [(data, signer, certs, candidates, trust, 0.3)] * cores))  # warm up
        t0 = time.perf_counter()
        counts = list(pool.map(_ceiling_worker, [job] * cores))
        elapsed = time.perf_counter() - t0
    return sum(counts) / elapsed


# --- end to end ------------------------------------------------------------------------------------


class Arrivals:
    """Wraps B's Maildir delivery: records when each Message-ID lands in an INBOX."""

    def __init__(self, inner, loop: asyncio.AbstractEventLoop, expected: int) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.loop = loop
        self.expected = expected
        self.times: dict[str, float] = {}
        self.done = asyncio.Event()
        self.lock = threading.Lock()

    def deliver(self, address: str, data: bytes, *, folder: str = "INBOX", flags: str = "") -> str:
        name = self.inner.deliver(address, data, folder=folder, flags=flags)
        head = data[: data.find(b"\r\n\r\n")]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                with self.lock:
                    self.times[line.split(b":", 1)[1].strip().decode()] = time.perf_counter()
                    if len(self.times) >= self.expected:
                        self.loop.call_soon_threadsafe(self.done.set)
        return str(name)


async def end_to_end(args: argparse.Namespace, root: Path) -> dict[str, float]:
    import aiosmtplib
    from e2e_support import A_DOMAIN, B_DOMAIN, CLINICIAN, PRACTITIONER, _start, build_templates

    from directory import service
    from directory.db import transaction
    from gateway.queue.worker import Workers

    os.environ.pop("MSSGW_DATABASE_URL", None)
    templates = build_templates(root / "templates")
    a = await _start("a", templates["a"], root)
    b = await _start("b", templates["b"], root)
    a.set_relay(B_DOMAIN, b.inbound_port, templates["b"].operator_dn)
    b.set_relay(A_DOMAIN, a.inbound_port, templates["a"].operator_dn)
    with transaction(a.sessions) as s:
        service.set_password(s, CLINICIAN, PASSWORD)
    loop = asyncio.get_running_loop()
    arrivals = None
    for op in (a, b):
        workers = Workers(op.settings, op.sessions, op.store, crypto_executor=args.executor,
                          worker_id=f"bench-{op.name}")  # fmt: skip
        if op is b:
            arrivals = Arrivals(workers.ctx.local, loop, args.messages)
            workers.ctx.local = arrivals
        op.workers = workers
        op.gateway.workers = workers  # the listeners wake the workers on enqueue
        await workers.start()
    assert arrivals is not None

    # Warm the worker processes (imports, key loading) before measuring.
    warm, _ = message(args.size, CLINICIAN, PRACTITIONER)
    arrivals.expected = 1
    a.enqueue(warm, CLINICIAN, [PRACTITIONER])
    a.workers.wake()
    await asyncio.wait_for(arrivals.done.wait(), 120)
    arrivals.times.clear()
    arrivals.done.clear()
    arrivals.expected = args.messages

    tls = ssl.create_default_context(cafile=str(a.home / "pki" / "ca.pem"))
    port = int(a.gateway.addresses["submission"][1])
    submitted: dict[str, float] = {}
    per = [args.messages // args.submitters + (1 if i < args.messages % args.submitters else 0)
           for i in range(args.submitters)]  # fmt: skip

    async def submitter(count: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=120)
        await client.connect()
        await client.login(CLINICIAN, PASSWORD)
        for _ in range(count):
            data, msgid = message(args.size, CLINICIAN, PRACTITIONER)
            submitted[msgid] = time.perf_counter()
            await client.sendmail(CLINICIAN, [PRACTITIONER], data)
        await client.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(submitter(n) for n in per if n))
    t_submitted = time.perf_counter()
    await asyncio.wait_for(arrivals.done.wait(), 600)
    t_end = max(arrivals.times.values())
    latencies = sorted(arrivals.times[m] - submitted[m] for m in submitted if m in arrivals.times)
    result = {
        "e2e_msgs_per_s": len(latencies) / (t_end - t0),
        "submit_msgs_per_s": len(submitted) / (t_submitted - t0),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "delivered": float(len(latencies)),
    }
    for op in (a, b):
        await op.workers.stop()
        op.gateway.workers = None
        await op.gateway.stop(grace=2)
    result["_a_keys"] = a.workers.keys  # type: ignore[assignment]
    result["_b_keys"] = b.workers.keys  # type: ignore[assignment]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--submitters", type=int, default=20)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--executor", choices=["process", "thread"], default="process")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    from e2e_support import CLINICIAN, PRACTITIONER

    with tempfile.TemporaryDirectory(prefix="mssgw-bench-") as tmp:
        res = asyncio.run(end_to_end(args, Path(tmp)))
        data, _ = message(args.size, CLINICIAN, PRACTITIONER)
        ceiling = crypto_ceiling(res.pop("_a_keys"), res.pop("_b_keys"), data, CLINICIAN, PRACTITIONER,  # type: ignore[arg-type]
                                 args.ceiling_seconds, cores)  # fmt: skip
    print(f"end to end A->B ({args.messages} x {args.size // 1000} KB, {args.submitters} submitters, "
          f"{cores} cores, crypto executor={args.executor})")  # fmt: skip
    print(f"  delivered          {res['delivered']:.0f}")
    print(f"  throughput         {res['e2e_msgs_per_s']:8.1f} msg/s  (submission alone {res['submit_msgs_per_s']:.1f})")
    print(f"  latency p50 / p99  {res['p50_ms']:8.0f} ms / {res['p99_ms']:.0f} ms")
    print(f"  crypto ceiling     {ceiling:8.1f} msg/s  (protect + open, {cores} processes)")
    print(f"  ratio e2e/ceiling  {res['e2e_msgs_per_s'] / ceiling:8.2f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
