"""Long fuzz run: the test suite's seeded SMTP/IMAP fuzzer against a gateway, figures printed as it goes.

By default it prepares a throw-away operator home and starts ``mssgw serve`` on random
loopback ports (the same world as ``tests/fuzz``), fuzzes for ``--minutes``, then checks
what the test checks: a legitimate client is served within 1 s, the process is alive,
no traceback in its log, every message answered 250 is in the queue. With
``--target host:port,...`` it fuzzes a gateway already running (ports in the order
submission,submissions,inbound,imap,imaps; 0 skips one) with ``--ca`` and the
fuzz account of ``--user``/``--password`` (raise that gateway's ``auth.max_failures``
or the fuzzer locks the account). Session ``I`` of seed ``S`` replays alone with
``--seed S --only I``. Findings (exact bytes) go to ``--findings`` (Markdown).

Usage: ``.venv/bin/python bench/fuzz_gateway.py --minutes 60 --seed 1 --concurrency 30``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuzz"))

from fuzz_harness import Fuzzer, Stats, Target, findings_markdown
from fuzz_inputs import CANARY, KNOWN_ISSUES, Credentials, Generator
from fuzz_world import (
    CREDS,
    GatewayProcess,
    legitimate_client,
    prepare_home,
    queue_ids,
    read_rss_kib,
    warm_fuzz_account,
)


async def run(ns: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="mssgw-fuzz-"))
    gateway: GatewayProcess | None = None
    creds: Credentials = CREDS
    try:
        if ns.target:
            host, ports = ns.target.split(":", 1)
            p = [int(x) for x in ports.split(",")]
            target = Target(host, p[0], p[1], p[2], p[3], p[4], ca=Path(ns.ca))
            creds = Credentials(ns.user, ns.password, (ns.user,), "doc@b.mssante.test", ns.user, ns.password)
        else:
            prepared = prepare_home(work / "home")
            target = prepared.target
            gateway = GatewayProcess(prepared.home, work / "gateway.log", workers=not ns.no_workers)
            await gateway.start()
            t0 = time.perf_counter()
            await legitimate_client(target)  # the first logins pay Argon2; the check after the run is warm
            print(f"legitimate client before the run: {time.perf_counter() - t0:.2f}s", flush=True)
            if not ns.cold:
                await warm_fuzz_account(target)
        generator = Generator(ns.seed, creds, avoid_known=ns.avoid_known)
        fuzzer = Fuzzer(target, generator, concurrency=ns.concurrency, step_timeout=ns.step_timeout,
                        session_timeout=ns.step_timeout * 4,
                        trace=(lambda i, d, b: print(f"{i} {d} {b[:500]!r}")) if ns.only is not None else None)
        stats = fuzzer.stats
        print(f"seed {ns.seed} concurrency {ns.concurrency} avoid-known {ns.avoid_known} work {work}", flush=True)
        sampler = None
        if gateway is not None:
            stats.rss_kib["before"] = read_rss_kib(gateway.pid)
            sampler = asyncio.create_task(_sample(gateway.pid, stats))
        loop = asyncio.get_running_loop()
        indices = [ns.only] if ns.only is not None else itertools.count()
        alive = gateway.alive if gateway else (lambda: True)
        runner = asyncio.create_task(fuzzer.run(indices, deadline=loop.time() + ns.minutes * 60, alive=alive))
        while not runner.done():
            await asyncio.wait([runner], timeout=ns.every)
            print(stats.report(), flush=True)
        await runner
        extra: list[str] = []
        if gateway is not None:
            if sampler:
                sampler.cancel()
            stats.rss_kib["after"] = read_rss_kib(gateway.pid)
            extra += await _checks(gateway, target, stats, work)
        print(stats.report())
        for line in extra:
            print(line)
        if ns.findings:
            Path(ns.findings).write_text(findings_markdown(ns.seed, stats, extra, KNOWN_ISSUES))
        return 0 if not extra else 1
    finally:
        if gateway is not None:
            await gateway.stop()
            if ns.keep:
                print(f"kept {work}")
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)


async def _sample(pid: int, stats: Stats) -> None:
    while True:
        stats.rss_kib["max"] = max(stats.rss_kib.get("max", 0), read_rss_kib(pid))
        await asyncio.sleep(0.5)


async def _checks(gateway: GatewayProcess, target: Target, stats: Stats, work: Path) -> list[str]:
    problems: list[str] = []
    if not gateway.alive():
        problems.append(f"gateway exited with status {gateway.proc.returncode if gateway.proc else '?'}")
    else:
        try:
            t0 = time.perf_counter()
            await asyncio.wait_for(legitimate_client(target), 1.0)
            print(f"legitimate client after the run: {time.perf_counter() - t0:.2f}s")
        except Exception as exc:
            problems.append(f"legitimate client not served within 1 s: {type(exc).__name__} {exc}")
    log = (work / "gateway.log").read_text(errors="replace")
    tb = [m.start() for m in re.finditer("Traceback", log)]
    if tb:
        problems.append(f"{len(tb)} tracebacks in the gateway log; first:\n{log[tb[0]:tb[0] + 2500]}")
    if CANARY in log:
        i = log.index(CANARY)
        problems.append(f"client text (canary) reached the log {log.count(CANARY)} times; first line: "
                        f"{log[log.rfind(chr(10), 0, i) + 1:log.find(chr(10), i)][:400]!r}")
    missing = set(stats.accepted) - queue_ids(gateway.home)
    if missing:
        problems.append(f"{len(missing)} messages answered 250 but not in the queue: {sorted(missing)[:10]}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**32))
    parser.add_argument("--concurrency", type=int, default=30)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between progress reports")
    parser.add_argument("--step-timeout", type=float, default=10.0)
    parser.add_argument("--only", type=int, help="replay this one session index")
    parser.add_argument("--avoid-known", action="store_true", help="skip sessions that hit known findings")
    parser.add_argument("--cold", action="store_true",
                        help="do not log the fuzz account in before the run (all first logins pay Argon2 at once)")
    parser.add_argument("--no-workers", action="store_true", help="start the gateway without queue workers")
    parser.add_argument("--findings", help="write the findings (exact bytes) to this Markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the home and log")
    parser.add_argument("--target", help="host:submission,submissions,inbound,imap,imaps of a running gateway")
    parser.add_argument("--ca", help="CA file of the running gateway (with --target)")
    parser.add_argument("--user", default=CREDS.user)
    parser.add_argument("--password", default=CREDS.password)
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
