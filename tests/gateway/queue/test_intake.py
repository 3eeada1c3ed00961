"""The queue's door for the edges: a message stored for a worker slot is handed to that worker,
even when the edge stopped waiting (the client hung up before its 250)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway.queue.intake import Arrival, Intake
from gateway.queue.store import QueueStore

SENDER = "dr.martin@a.mssante.test"
LOCAL = "secretariat@a.mssante.test"
MESSAGE = f"From: {SENDER}\r\nTo: {LOCAL}\r\nSubject: x\r\n\r\nbody\r\n".encode()


class Slots:
    """This process's workers as the intake sees them: one slot, and what was done with it."""

    def __init__(self) -> None:
        self.taken: list[tuple[str, bytes]] = []
        self.cancelled = 0
        self.settled = asyncio.Event()

    def reserve(self) -> str | None:
        return "w1"

    def cancel(self) -> None:
        self.cancelled += 1
        self.settled.set()

    def take(self, row: dict[str, Any], data: bytes) -> None:
        self.taken.append((row["id"], data))
        self.settled.set()


async def test_a_message_stored_after_its_edge_stopped_waiting_is_still_handed_over(operator) -> None:  # type: ignore[no-untyped-def]
    _, _, store = operator
    assert isinstance(store, QueueStore)
    gate = threading.Event()
    writing = threading.Event()
    writer = ThreadPoolExecutor(max_workers=1)
    real_enqueue = store.enqueue

    def slow_enqueue(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        gate.wait(10)  # the disk is slow today
        return real_enqueue(*args, **kwargs)

    store.enqueue = slow_enqueue  # type: ignore[method-assign]
    slots = Slots()
    intake = Intake(store, writer=writer, handoff=lambda: slots)
    try:
        waiting = asyncio.create_task(intake.accept(Arrival(MESSAGE, SENDER, [LOCAL], "submission")))
        await asyncio.to_thread(writing.wait, 10)
        waiting.cancel()  # the client hung up: aiosmtpd cancels the session's handler
        await asyncio.gather(waiting, return_exceptions=True)
        gate.set()  # the write ends and commits, leased to w1
        await asyncio.wait_for(slots.settled.wait(), 10)
    finally:
        gate.set()
        writer.shutdown(wait=True)
    (queued,) = store.list()
    assert store.get(queued["id"])["claimed_by"] == "w1"
    # w1 got it, from memory: not left leased to a worker that was never told (five minutes' wait)
    assert slots.taken == [(queued["id"], MESSAGE)] and slots.cancelled == 0
