"""Two nodes of operator A on one PostgreSQL and nothing else on the delivery path: any node delivers any message.

Each node is a real ``mssgw serve`` process with a home of its own (its own spool folder, config,
logs); they share the database and, for local mailboxes only, the Maildir folder (a symlink
standing for the shared mail volume; the README's multi-node section).  Operator B is a third
process with its own database.  The fault-injection harness builds A and B and checks the end
state (each (message, recipient) delivered, bounced or quarantined exactly once).

- ``test_a_node_killed_with_a_full_queue_is_delivered_by_the_other``: node 1 accepts 200
  messages with its workers off (``queue.workers = 0``) and is SIGKILLed; its spool folder is
  deleted; node 2, which never saw those messages, delivers every one exactly once: the bytes
  came from the database (``gateway.queue.spool.DatabaseSpool``).
- ``test_both_nodes_working_and_one_killed_at_random``: both nodes accept and deliver; one,
  drawn at random, is SIGKILLed at a random point of the submission and restarted later;
  nothing is lost, nothing duplicated.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import smtplib
import tomllib
from pathlib import Path

import pytest
from e2e_support import A_DOMAIN, free_port
from fault_harness import (
    HarnessError,
    Node,
    Planned,
    Report,
    RunStats,
    Submitter,
    _quiescent,
    _restart,
    _submit_all,
    _until,
    build_operators,
    check,
    plan_messages,
)
from faultproxy import FaultProxy
from sqlalchemy import func, select

from directory import admin
from directory.db import make_engine, read_session_factory, session_factory, transaction
from gateway.config import CONFIG_NAME, render_toml
from gateway.queue.models import QueuedBytes, QueuedMessage

WAIT = 480.0  # bound of each wait (a start, the drain) on a slow shared machine: a hang fails, slowness does not


def _second_node(a: Node, home: Path, *, workers: int) -> Node:
    """Node 2 of operator A: a home of its own (config, the public PKI, its TLS listener key and the
    key-encryption key as provisioned on every node, its own spool and logs), the same database, the
    Maildir of the shared mail volume.  No OpenPGP keyring and no operator or CA key: node 2 relays
    with the operator key sealed in the database and imports the OpenPGP keys the directory lists."""
    shutil.copytree(a.home, home, ignore=shutil.ignore_patterns("spool", "mail", "serve.log", "S.*", "*.lock",
                                                                "gnupg", "operator.key", "ca.key"))  # fmt: skip
    (home / "mail").symlink_to(a.home / "mail", target_is_directory=True)
    config = tomllib.loads((a.home / CONFIG_NAME).read_text(encoding="utf-8"))
    ports = {"submission": free_port(), "inbound": free_port()}
    config["listen"].update({"submission": f"127.0.0.1:{ports['submission']}",
                             "inbound": f"127.0.0.1:{ports['inbound']}"})  # fmt: skip
    config["queue"]["workers"] = workers
    (home / CONFIG_NAME).write_text(render_toml(config), encoding="utf-8")
    return Node("a2", A_DOMAIN, home, ports, a.operator_dn, a.database_url)


def _set_workers(node: Node, workers: int) -> None:
    config = tomllib.loads((node.home / CONFIG_NAME).read_text(encoding="utf-8"))
    config["queue"]["workers"] = workers
    (node.home / CONFIG_NAME).write_text(render_toml(config), encoding="utf-8")


def _route_reports_to(b: Node, a_node: Node) -> None:
    """B relays its reports (DSNs, MDNs, notices) to this node of A."""
    engine = make_engine(b.database_url)
    try:
        with transaction(session_factory(engine)) as s:
            admin.trust_domain(s, A_DOMAIN, relay=f"127.0.0.1:{a_node.ports['inbound']}",
                               operator_dn=a_node.operator_dn)  # fmt: skip
    finally:
        engine.dispose()


def _queue_counts(node: Node) -> tuple[int, int, int]:
    """(submissions queued, of which not done, bytes rows in ``queue_spool``)."""
    with read_session_factory(node.db())() as s:
        total = s.scalar(select(func.count()).select_from(QueuedMessage).where(QueuedMessage.origin == "submission"))
        open_ = s.scalar(select(func.count()).select_from(QueuedMessage).where(
            QueuedMessage.origin == "submission", QueuedMessage.done.is_(False)))  # fmt: skip
        rows = s.scalar(select(func.count()).select_from(QueuedBytes))
    return int(total or 0), int(open_ or 0), int(rows or 0)


def _assert_exactly_once(report: Report, messages: int) -> None:
    assert report.ok, report.summary()
    c = report.counts
    assert c["submitted"] == messages and c["lost"] == 0 and c["duplicates"] == 0, report.summary()
    assert c["delivered"] > 0 and c["bounced"] > 0, report.summary()
    assert c["delivered"] + c["bounced"] + c["quarantined"] == c["pairs"], report.summary()


async def _check(a: Node, b: Node, submitted: list[Planned], *others: Node) -> Report:
    try:
        return await asyncio.to_thread(check, a, b, submitted)
    finally:
        for node in (a, b, *others):
            if node.engine is not None:
                node.engine.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_node_killed_with_a_full_queue_is_delivered_by_the_other(tmp_path: Path,
                                                                         backend: dict[str, str]) -> None:
    messages = 200
    proxy_port = free_port()
    a1, b = await asyncio.to_thread(build_operators, tmp_path, backend, proxy_port)
    proxy = FaultProxy(b.ports["inbound"], proxy_port, seed=1501, drop_probability=0.0)  # a plain relay here
    await proxy.start()
    _set_workers(a1, 0)
    a2 = _second_node(a1, tmp_path / "a2", workers=4)
    plan = plan_messages(messages, seed=1501)
    stats = RunStats()
    try:
        await _restart(b, WAIT)
        await _restart(a1, WAIT)
        await _submit_all(a1, plan, stats, asyncio.Condition(), window=10 * messages, timeout=WAIT)
        assert stats.anomalies == [] and len(stats.submitted) == messages
        await asyncio.to_thread(a1.kill)
        # Everything accepted is still waiting, its bytes in the database and in no file of node 2.
        assert await asyncio.to_thread(_queue_counts, a1) == (messages, messages, messages)
        shutil.rmtree(a1.home / "spool", ignore_errors=True)  # node 1's disk is gone with it
        assert not any((a2.home / "spool").glob("*/*"))
        _route_reports_to(b, a2)
        await _restart(a2, WAIT)
        await _quiescent(a2, b, WAIT)
    finally:
        await proxy.stop()
        for node in (a2, b, a1):
            await asyncio.to_thread(node.stop)
    total, open_, rows = await asyncio.to_thread(_queue_counts, a2)
    assert (total, open_, rows) == (messages, 0, 0)  # every message final, its bytes dropped with it
    assert not (a1.home / "spool").exists()  # node 1 never came back
    report = await _check(a1, b, stats.submitted, a2)  # a1's Maildir is the shared mail volume
    print(report.summary())
    _assert_exactly_once(report, messages)


async def _submit_to_both(nodes: list[Node], plan: list[Planned], stats: RunStats, kill_after: int,
                          victim: Node, rng: random.Random) -> None:  # fmt: skip
    """Alternate submissions between the nodes; SIGKILL ``victim`` once ``kill_after`` are in; a
    submission cut by the kill is resent to the survivor unless the shared database holds it."""
    subs = {node.name: Submitter(node) for node in nodes}
    try:
        for i, p in enumerate(plan):
            if i == kill_after:
                await asyncio.sleep(rng.uniform(0.0, 1.0))  # a random moment, not a wait for an event
                await asyncio.to_thread(victim.kill)
            live = [n for n in nodes if n.alive()]
            node = live[i % len(live)]
            try:
                await asyncio.to_thread(subs[node.name].send, p)
            except (smtplib.SMTPException, OSError):
                subs[node.name].reset(p.sender)
                if not await asyncio.to_thread(node.holds, p.message_id):
                    other = next(n for n in nodes if n is not node and n.alive())
                    await asyncio.to_thread(subs[other.name].send, p)
                    stats.resubmitted += 1
            stats.submitted.append(p)
    finally:
        for sub in subs.values():
            await asyncio.to_thread(sub.reset)


@pytest.mark.postgres
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_both_nodes_working_and_one_killed_at_random(tmp_path: Path, backend: dict[str, str]) -> None:
    messages = 120
    rng = random.Random(1502)
    proxy_port = free_port()
    a1, b = await asyncio.to_thread(build_operators, tmp_path, backend, proxy_port)
    proxy = FaultProxy(b.ports["inbound"], proxy_port, seed=1502, drop_probability=0.0)
    await proxy.start()
    a2 = _second_node(a1, tmp_path / "a2", workers=4)
    victim = rng.choice([a1, a2])
    survivor = a2 if victim is a1 else a1
    _route_reports_to(b, survivor)
    plan = plan_messages(messages, seed=1502)
    stats = RunStats()
    try:
        for node in (b, a1, a2):
            await _restart(node, WAIT)
        await _submit_to_both([a1, a2], plan, stats, rng.randint(messages // 4, messages * 3 // 4), victim, rng)
        assert victim.kills == 1 and not victim.alive()
        await _until(lambda: survivor.alive(), "the survivor still up", 5)
        await _restart(victim, WAIT)  # it comes back later; its abandoned claims were taken back meanwhile
        await _quiescent(survivor, b, WAIT)
    except HarnessError as exc:  # still check: the report says what is where
        stats.anomalies.append(str(exc))
    finally:
        await proxy.stop()
        for node in (a1, a2, b):
            await asyncio.to_thread(node.stop)
    total, open_, rows = await asyncio.to_thread(_queue_counts, a1)
    assert (total, open_, rows) == (messages, 0, 0) and stats.anomalies == []
    report = await _check(a1, b, stats.submitted, a2)
    print(report.summary(), f"victim={victim.name} resubmitted={stats.resubmitted}")
    _assert_exactly_once(report, messages)
