"""End-to-end throughput A -> B against the crypto-only ceiling, measured in the same run.

Two operators on loopback, each a real ``mssgw serve`` process with its own home (the e2e
tests' setup from ``tests/e2e/e2e_support.py``: dev PKIs, trust lists, anchors, certificates,
mailboxes; listen ports written into each home's ``mssgw.toml``, IMAP and metrics off).  The
bench process only submits and watches: 20 concurrent submitters (aiosmtplib, STARTTLS, AUTH
once per session, connection reused) send 20 KB messages to B's practitioner; each message is
queued, signed and encrypted by A's workers, relayed over mutual TLS to B's inbound listener,
queued, decrypted, verified and delivered to B's Maildir.  Completion is detected by polling
the ``new/`` folder of B's INBOX all along (every ``--poll`` seconds); latency is submission
start -> file seen.  By default the submitters send as fast as they can, so submission outruns
delivery and latency is mostly queueing; ``--rate R`` paces them to R messages/s in all, for
the latency of a gateway below saturation.

The ceiling is ``protect_job`` + ``open_job`` (the same crypto calls the workers make) in a
tight loop on a process pool with one process per core, run after the gateways have stopped.
The protocol floor (``bench_protocol_floor.py``: the same load through a bare
aiosmtpd/aiosmtplib relay over STARTTLS, no crypto, database or disk) is measured in the same
run: with the ceiling's crypto added, it bounds what any gateway built on these libraries can do
on these cores.  Compare ratios, not absolute figures across runs (see
/work/shared/PERFORMANCE.md); the target is e2e / ceiling >= 0.5.

    .venv/bin/python bench/bench_e2e.py [--messages N] [--submitters 20] [--size 20000] [--rate R]
                                        [--ceiling-seconds S] [--no-floor] [--log-level info]
                                        [--keep DIR] [--profile cprofile|yappi|py-spy]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import statistics
import subprocess  # nosec B404 - starts our own `mssgw serve`
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_protocol_floor import free_port, message, run_floor, wait_listening  # noqa: E402

PASSWORD = "bench-password-0123456789"


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


def _keystore(home: Path) -> Any:
    from directory.db import make_engine, session_factory
    from gateway.config import load_settings
    from gateway.crypto.keystore import KeyStore

    settings = load_settings(home)
    return KeyStore(settings, session_factory(make_engine(settings.database_url)))


def crypto_ceiling(a_home: Path, b_home: Path, data: bytes, sender: str, rcpt: str, seconds: float,
                   cores: int) -> float:  # fmt: skip
    a_keys, b_keys = _keystore(a_home), _keystore(b_home)
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


# --- the two gateways ------------------------------------------------------------------------------


def prepare_homes(root: Path) -> dict[str, dict[str, Any]]:
    """Both homes from the e2e templates, with ports in mssgw.toml and relays pointing at each other."""
    from e2e_support import A_DOMAIN, B_DOMAIN, CLINICIAN, _write_config, build_templates

    from directory import admin
    from directory.db import make_engine, session_factory, transaction
    from gateway.config import load_settings

    templates = build_templates(root / "templates")
    ops: dict[str, dict[str, Any]] = {}
    for name in ("a", "b"):
        home = root / name
        shutil.copytree(templates[name].home, home)
        ports = {"submission": free_port(), "inbound": free_port()}
        _write_config(templates[name], home, ports)
        ops[name] = {"home": home, "ports": ports, "dn": templates[name].operator_dn}
    for name, peer, peer_domain in (("a", "b", B_DOMAIN), ("b", "a", A_DOMAIN)):
        settings = load_settings(ops[name]["home"])
        engine = make_engine(settings.database_url)
        with transaction(session_factory(engine)) as s:
            admin.trust_domain(s, peer_domain, relay=f"127.0.0.1:{ops[peer]['ports']['inbound']}",
                               operator_dn=ops[peer]["dn"])  # fmt: skip
            if name == "a":
                admin.set_password(s, CLINICIAN, PASSWORD)
        engine.dispose()
        ops[name]["settings"] = settings
    return ops


def start_gateway(home: Path, log_level: str, profile: str = "") -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "mssgw"
    command = [str(exe), "serve", "--log-level", log_level]
    if profile == "cprofile":  # the event loop's thread only; read with pstats
        command = [sys.executable, "-m", "cProfile", "-o", str(home / "serve.prof"), *command]
    elif profile == "yappi":  # CPU time of every thread of the gateway (`pip install yappi`); read with pstats
        command = [sys.executable, "-m", "yappi", "-b", "-c", "cpu", "-f", "pstat", "-o", str(home / "serve.prof"),
                   *command]

    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSGW_")}
    env["MSSGW_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)  # the tree this bench belongs to, whatever the venv has installed
    log = (home / "serve.log").open("wb")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # nosec B603


def spy(pid: int, home: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling every thread of ``pid`` and its crypto processes (``pip install py-spy``).

    Collapsed stacks land in ``home/serve.spy``; idle threads are left out, so the counts are
    where the CPU went during the measured phase.
    """
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    command = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "100",
               "--format", "raw", "--output", str(home / "serve.spy")]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # nosec B603


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _task_cpu(path: Path, tick: int) -> float:
    try:
        fields = (path / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / tick


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU of ``pid`` split into its event loop's thread, its other threads and its
    live descendants (the crypto processes); Linux /proc, zeros elsewhere."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    split = {"loop": 0.0, "threads": 0.0, "crypto": 0.0}
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
            if current != pid:
                continue
            split["loop" if task.name == str(pid) else "threads"] += _task_cpu(task, tick)
        if current != pid:
            split["crypto"] += _task_cpu(Path(f"/proc/{current}"), tick)
    return split


class Watcher:
    """Polls B's INBOX ``new/`` and notes when each Message-ID first appears."""

    def __init__(self, folder: Path, interval: float) -> None:
        self.folder = folder
        self.interval = interval
        self.seen: set[str] = set()
        self.times: dict[str, float] = {}

    def scan(self) -> None:
        now = time.perf_counter()
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names:
            if name in self.seen:
                continue
            self.seen.add(name)
            with open(self.folder / name, "rb") as fh:
                head = fh.read(16384)
            for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    self.times.setdefault(line.split(b":", 1)[1].strip().decode(), now)
                    break

    async def watch(self) -> None:
        """Scan every ``interval`` until cancelled: arrival times are taken while submitters are
        still sending, not when the bench starts waiting."""
        while True:
            self.scan()
            await asyncio.sleep(self.interval)

    async def until(self, wanted: set[str], timeout: float) -> None:
        end = time.perf_counter() + timeout
        while not wanted <= self.times.keys():
            if time.perf_counter() > end:
                missing = len(wanted - self.times.keys())
                raise TimeoutError(f"{missing} of {len(wanted)} messages not delivered after {timeout:.0f} s")
            await asyncio.sleep(self.interval)
            self.scan()


async def end_to_end(args: argparse.Namespace, ops: dict[str, dict[str, Any]],
                     pids: dict[str, int]) -> dict[str, float]:  # fmt: skip
    import aiosmtplib
    from e2e_support import CLINICIAN, PRACTITIONER

    from gateway.delivery.maildir import MaildirDelivery

    a, b = ops["a"], ops["b"]
    inbox = MaildirDelivery(b["settings"].mail_dir).folder_path(PRACTITIONER, "INBOX") / "new"
    watcher = Watcher(inbox, args.poll)
    tls = ssl.create_default_context(cafile=str(a["home"] / "pki" / "ca.pem"))
    port = a["ports"]["submission"]

    async def session(count: int, submitted: dict[str, float], slot: int = 0, start: float = 0.0) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=120)
        await client.connect()
        await client.login(CLINICIAN, PASSWORD)
        for k in range(count):
            data, msgid = message(args.size, CLINICIAN, PRACTITIONER)
            if args.rate > 0:  # an open load: message k of this submitter leaves at its planned time
                await asyncio.sleep(max(0.0, start + (k * args.submitters + slot) / args.rate - time.perf_counter()))
            submitted[msgid] = time.perf_counter()
            await client.sendmail(CLINICIAN, [PRACTITIONER], data)
        await client.quit()

    # Warm up: worker processes started, keys loaded, relay connections made, caches filled.
    warm: dict[str, float] = {}
    await asyncio.gather(*(session(2, warm) for _ in range(min(4, args.submitters))))
    await watcher.until(set(warm), 120)

    submitted: dict[str, float] = {}
    per = [args.messages // args.submitters + (1 if i < args.messages % args.submitters else 0)
           for i in range(args.submitters)]  # fmt: skip
    spies = [spy(pid, ops[name]["home"]) for name, pid in pids.items()] if args.profile == "py-spy" else []
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    if args.rate > 0:
        t0 += 0.5  # paced: the first messages leave once every session has logged in
    watching = asyncio.create_task(watcher.watch())
    await asyncio.gather(*(session(n, submitted, i, t0) for i, n in enumerate(per) if n))
    t_submitted = time.perf_counter()
    await watcher.until(set(submitted), args.timeout)
    watching.cancel()
    for process in spies:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    t_end = max(watcher.times[m] for m in submitted)
    cpu = {name: {k: v - cpu0[name][k] for k, v in cpu_seconds(pid).items()} for name, pid in pids.items()}
    latencies = sorted(watcher.times[m] - submitted[m] for m in submitted)
    return {
        **{f"cpu_ms_{name}": 1000 * sum(split.values()) / len(submitted) for name, split in cpu.items()},
        **{f"cpu_ms_{name}_{part}": 1000 * value / len(submitted)
           for name, split in cpu.items() for part, value in split.items()},
        "e2e_msgs_per_s": len(latencies) / (t_end - t0),
        "submit_msgs_per_s": len(submitted) / (t_submitted - t0),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "delivered": float(len(latencies)),
    }


async def run(args: argparse.Namespace, ops: dict[str, dict[str, Any]]) -> dict[str, float]:
    procs = [start_gateway(ops[n]["home"], args.log_level, args.profile) for n in ("a", "b")]
    try:
        for name, proc in zip(("a", "b"), procs, strict=True):
            for port in ops[name]["ports"].values():
                await wait_listening(port, proc, timeout=60.0)
        return await end_to_end(args, ops, {"a": procs[0].pid, "b": procs[1].pid})
    finally:
        for proc in procs:
            stop_gateway(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--submitters", type=int, default=20)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between scans of B's Maildir")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--rate", type=float, default=0.0,
                        help="submit at this many messages/s in all (latency below saturation); 0: as fast as possible")
    parser.add_argument("--no-floor", action="store_true", help="skip the protocol floor (bench_protocol_floor.py)")
    parser.add_argument("--keep", type=Path, help="build the homes here and keep them (logs, databases)")
    parser.add_argument("--profile", choices=["cprofile", "yappi", "py-spy"], default="",
                        help="cProfile of the event loop or yappi CPU time of every thread (DIR/a/serve.prof), or py-spy samples of every thread and "
                             "process (DIR/a/serve.spy, collapsed stacks)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    from e2e_support import CLINICIAN, PRACTITIONER

    os.environ.pop("MSSGW_DATABASE_URL", None)
    with tempfile.TemporaryDirectory(prefix="mssgw-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ops = prepare_homes(root)
        res = asyncio.run(run(args, ops))
        data, _ = message(args.size, CLINICIAN, PRACTITIONER)
        ceiling = crypto_ceiling(ops["a"]["home"], ops["b"]["home"], data, CLINICIAN, PRACTITIONER,
                                 args.ceiling_seconds, cores)  # fmt: skip
    floor = run_floor(args.messages, args.submitters, args.size) if not args.no_floor else None
    paced = f", paced at {args.rate:g} msg/s" if args.rate > 0 else ""
    print(f"end to end A->B ({args.messages} x {args.size // 1000} KB, {args.submitters} submitters{paced}, "
          f"{cores} cores, A and B as `mssgw serve` processes)")  # fmt: skip
    print(f"  delivered          {res['delivered']:.0f}")
    print(f"  throughput         {res['e2e_msgs_per_s']:8.1f} msg/s  (submission alone {res['submit_msgs_per_s']:.1f})")
    print(f"  latency p50 / p99  {res['p50_ms']:8.0f} ms / {res['p99_ms']:.0f} ms")
    print(f"  CPU per message    A {res['cpu_ms_a']:.1f} ms, B {res['cpu_ms_b']:.1f} ms  (gateway + its crypto processes)")
    for name in ("a", "b"):
        print(f"    {name.upper()}: event loop {res[f'cpu_ms_{name}_loop']:.1f} ms, other threads "
              f"{res[f'cpu_ms_{name}_threads']:.1f} ms, crypto processes {res[f'cpu_ms_{name}_crypto']:.1f} ms")
    print(f"  crypto ceiling     {ceiling:8.1f} msg/s  (protect + open, {cores} processes)")
    print(f"  ratio e2e/ceiling  {res['e2e_msgs_per_s'] / ceiling:8.2f}  (target >= 0.5)")
    if floor is not None:
        total = floor["floor_cpu_ms_a"] + floor["floor_cpu_ms_b"] + floor["floor_cpu_ms_client"]
        print(f"  protocol floor     {floor['floor_msgs_per_s']:8.1f} msg/s  (bare aiosmtpd/aiosmtplib relay bench->A->B "
              f"over STARTTLS, no crypto, no disk: bench/bench_protocol_floor.py)")  # fmt: skip
        print(f"    CPU per message  A {floor['floor_cpu_ms_a']:.1f} ms, B {floor['floor_cpu_ms_b']:.1f} ms, "
              f"load {floor['floor_cpu_ms_client']:.1f} ms (total {total:.1f} ms)")  # fmt: skip
        print(f"  ratio floor/ceiling {floor['floor_msgs_per_s'] / ceiling:7.2f}  (what the SMTP stack alone allows)")
        # Any gateway on these libraries does at least the floor's SMTP work and the ceiling's
        # crypto for each message, on the same cores: its throughput cannot exceed this.
        bound = 1000 * cores / (total + 1000 * cores / ceiling)
        print(f"  bound              {bound:8.1f} msg/s  = {cores} cores / (floor CPU {total:.1f} ms + crypto CPU "
              f"{1000 * cores / ceiling:.1f} ms per message); ratio bound/ceiling {bound / ceiling:.2f}")  # fmt: skip
        print(f"  ratio e2e/floor    {res['e2e_msgs_per_s'] / floor['floor_msgs_per_s']:8.2f}")


if __name__ == "__main__":
    main()
