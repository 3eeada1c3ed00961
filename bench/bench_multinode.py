"""Throughput with nodes: operator A as 1 node on SQLite, 1 node on PostgreSQL and 2 nodes on PostgreSQL, in one run.

Each scenario builds operators A and B afresh with the fault-injection harness
(``tests/e2e/fault_harness.py``: real ``mssgw serve`` processes, dev PKIs, S/MIME and OpenPGP
recipients at B, a local ward at A, a recipient B refuses and one B quarantines, so DSNs and
notices flow back); B is one node on the same database server as A (its own database).  A's
second node has a home of its own (``tests/e2e/test_multinode.py``'s provisioning: same
configuration and keys, its own spool, the Maildir folder shared) and its own audit chain.
After ``--warmup`` messages (crypto processes spawned, pools filled), the bench submits
``--messages`` messages over SMTP submission, spread over A's nodes (4 connections per node), and
stops the clock when neither A's nor B's queue has work left.

Figures per scenario: end-to-end msg/s (first submission to empty queues), and CPU seconds per
message of every gateway process and its crypto processes (A's nodes and B), plus the
PostgreSQL server's when ``--pg-datadir`` names its data folder (its postmaster.pid), so SQLite
(in process) and PostgreSQL (a server) compare on the same footing.  Compare ratios within one
run, not absolute figures across runs: the machine is shared.

    MSSGW_TEST_PG_URL=postgresql://... .venv/bin/python bench/bench_multinode.py \\
        [--messages 150] [--warmup 12] [--pg-datadir /tmp/pg-XXXX/data] [--scenarios sqlite-1,pg-1,pg-2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from fault_harness import Node, Submitter, _restart, build_operators, plan_messages  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from test_multinode import _route_reports_to, _second_node  # noqa: E402

from gateway.config import CONFIG_NAME, render_toml  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float:
    """utime + stime of one live process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _tree(pid: int) -> list[int]:
    found, todo = [pid], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def cpu_now(pids: list[int]) -> dict[int, float]:
    """CPU seconds of every process in the trees rooted at ``pids``."""
    return {p: _cpu_of(p) for root in pids for p in _tree(root)}


@contextmanager
def databases(server: str | None, names: list[str]) -> Iterator[dict[str, str]]:
    if server is None:
        yield {}
        return
    admin = create_engine(server.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    base = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    made = {n: f"mssgw_bench_{n}_{uuid.uuid4().hex[:8]}" for n in names}
    with admin.connect() as conn:
        for db in made.values():
            conn.execute(text(f'CREATE DATABASE "{db}"'))
    try:
        yield {n: f"{base}/{db}" for n, db in made.items()}
    finally:
        with admin.connect() as conn:
            for db in made.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


async def _submit(nodes: list[Node], messages: int, seed: int, per_node: int) -> None:
    plan = plan_messages(messages, seed)
    lanes = [(node, Submitter(node)) for node in nodes for _ in range(per_node)]
    queues: list[list[int]] = [list(range(i, messages, len(lanes))) for i in range(len(lanes))]

    async def lane(node_sub: tuple[Node, Submitter], indexes: list[int]) -> None:
        _, sub = node_sub
        try:
            for i in indexes:
                await asyncio.to_thread(sub.send, plan[i])
        finally:
            await asyncio.to_thread(sub.reset)

    await asyncio.gather(*(lane(ls, q) for ls, q in zip(lanes, queues, strict=True)))


async def _drained(a: Node, b: Node, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        a_open, _ = await asyncio.to_thread(a.open_messages)
        b_open, _ = await asyncio.to_thread(b.open_messages)
        if a_open == 0 and b_open == 0:
            return
        if loop.time() > end:
            raise TimeoutError(f"queues not drained (A {a_open}, B {b_open})")
        await asyncio.sleep(0.1)


async def scenario(name: str, root: Path, urls: dict[str, str], nodes: int, args: argparse.Namespace,
                   pg_pid: int | None) -> dict[str, float]:  # fmt: skip
    proxy_port = __import__("e2e_support").free_port()
    a1, b = await asyncio.to_thread(build_operators, root, urls or None, proxy_port)
    proxy = FaultProxy(b.ports["inbound"], proxy_port, seed=7, drop_probability=0.0)
    await proxy.start()
    a_nodes = [a1]
    if nodes == 2:
        a_nodes.append(await asyncio.to_thread(_second_node, a1, root / "a2", workers=4))
        for i, node in enumerate(a_nodes, 1):  # one audit chain per node
            cfg = node.home / CONFIG_NAME
            config = tomllib.loads(cfg.read_text(encoding="utf-8"))
            config.setdefault("audit", {})["node"] = f"a{i}"
            cfg.write_text(render_toml(config), encoding="utf-8")
    _route_reports_to(b, a_nodes[-1])
    try:
        for node in (b, *a_nodes):
            await _restart(node, 300)
        roots = [n.proc.pid for n in (b, *a_nodes) if n.proc is not None] + ([pg_pid] if pg_pid else [])
        if args.warmup:  # crypto processes spawned, caches and connection pools filled: not measured
            await _submit(a_nodes, args.warmup, seed=5, per_node=1)
            await _drained(a1, b, args.timeout)
        before = cpu_now(roots)
        started = time.monotonic()
        await _submit(a_nodes, args.messages, seed=11, per_node=4)
        submitted = time.monotonic() - started
        await _drained(a1, b, args.timeout)
        seconds = time.monotonic() - started
        after = cpu_now(roots)
    finally:
        await proxy.stop()
        for node in (*a_nodes, b):
            await asyncio.to_thread(node.stop)
            if node.engine is not None:
                node.engine.dispose()
    cpu = sum(after.values()) - sum(before.get(p, 0.0) for p in after)
    return {"msg_s": args.messages / seconds, "submit_msg_s": args.messages / submitted,
            "cpu_ms_per_msg": 1000 * cpu / args.messages, "seconds": seconds}


async def main_async(args: argparse.Namespace) -> None:
    server = os.environ.get("MSSGW_TEST_PG_URL")
    pg_pid = None
    if args.pg_datadir:
        pg_pid = int((Path(args.pg_datadir) / "postmaster.pid").read_text().split()[0])
    results: dict[str, dict[str, float]] = {}
    for name in args.scenarios.split(","):
        kind, count = name.split("-")
        if kind == "pg" and not server:
            raise SystemExit("MSSGW_TEST_PG_URL is not set: PostgreSQL scenarios need a server")
        with tempfile.TemporaryDirectory(prefix=f"mssgw-bench-{name}-") as tmp, \
                databases(server if kind == "pg" else None, ["a", "b"]) as urls:  # fmt: skip
            results[name] = await scenario(name, Path(tmp), urls, int(count), args,
                                           pg_pid if kind == "pg" else None)  # fmt: skip
        r = results[name]
        print(f"{name:9} {r['msg_s']:7.1f} msg/s end to end  {r['submit_msg_s']:7.1f} msg/s accepted  "
              f"{r['cpu_ms_per_msg']:7.1f} ms CPU/msg  ({args.messages} messages in {r['seconds']:.1f} s)",
              flush=True)  # fmt: skip
    if "pg-1" in results and "pg-2" in results:
        print(f"2 nodes / 1 node on PostgreSQL: {results['pg-2']['msg_s'] / results['pg-1']['msg_s']:.2f}x msg/s, "
              f"{results['pg-2']['cpu_ms_per_msg'] / results['pg-1']['cpu_ms_per_msg']:.2f}x CPU/msg")
    if "sqlite-1" in results and "pg-1" in results:
        print(f"PostgreSQL / SQLite, 1 node: {results['pg-1']['msg_s'] / results['sqlite-1']['msg_s']:.2f}x msg/s, "
              f"{results['pg-1']['cpu_ms_per_msg'] / results['sqlite-1']['cpu_ms_per_msg']:.2f}x CPU/msg")
    print(f"cores: {os.cpu_count()} (B and, with --pg-datadir, the PostgreSQL server run on the same cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=150)
    parser.add_argument("--scenarios", default="sqlite-1,pg-1,pg-2")
    parser.add_argument("--pg-datadir", help="the PostgreSQL data folder, to count the server's CPU too")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--warmup", type=int, default=12, help="messages sent and delivered before the clock starts")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
