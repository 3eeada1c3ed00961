"""Trace fields of delivered mail (RFC 5321 §4.4): Return-Path on top, the hops' Received kept."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from gateway.delivery.maildir import MailboxEvents, MaildirDelivery, mailbox_events
from gateway.delivery.trace import peer_trace, return_path, with_trace

OUTER = (b"Received: from mx.a.test ([127.0.0.1])\r\n\tby mx.b.test (mssgw) with ESMTPS id q1;\r\n"
         b"\tMon, 30 Nov 2026 00:00:00 +0000\r\n"
         b"From: dr@a.test\r\nSubject: Message securise\r\nReceived: not a leading trace field\r\n\r\nCMS\r\n")  # fmt: skip


def test_peer_trace_takes_the_leading_received_fields_only() -> None:
    trace = peer_trace(OUTER)
    assert trace.startswith(b"Received: from mx.a.test") and trace.endswith(b"+0000\r\n")
    assert b"not a leading" not in trace and b"From:" not in trace
    assert peer_trace(b"From: x\r\n\r\nbody") == b""


def test_with_trace_puts_return_path_first_and_drops_forged_ones() -> None:
    inner = b"Return-Path: <forged@evil.test>\r\nFrom: dr@a.test\r\nSubject: s\r\n\r\nBonjour\r\nReturn-Path: body\r\n"
    out = with_trace(inner, "dr@a.test", received=peer_trace(OUTER))
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"Return-Path: <dr@a.test>" and lines[1].startswith(b"Received: from mx.a.test")
    assert head.count(b"Return-Path") == 1 and b"forged" not in out
    assert body == b"Bonjour\r\nReturn-Path: body\r\n"  # the body is never touched


def test_null_sender_and_unsafe_characters() -> None:
    assert return_path("") == b"Return-Path: <>\r\n"
    assert return_path("a>\r\nX-Evil: 1@b") == b"Return-Path: <aX-Evil: 1@b>\r\n"
    assert with_trace(b"From: a\n\nbody\n", "") == b"Return-Path: <>\nFrom: a\n\nbody\n"  # bare LF kept bare


async def test_delivery_wakes_listeners_of_that_mailbox_from_another_thread(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    alice = delivery.mailbox_path("alice@a.test")
    with mailbox_events.listen(alice) as alice_changed, mailbox_events.listen(delivery.mailbox_path("bob@a.test")) as bob_changed:
        worker = threading.Thread(target=delivery.deliver, args=("ALICE@A.TEST", b"Subject: x\r\n\r\ny\r\n"))
        worker.start()
        await asyncio.wait_for(alice_changed.wait(), 10)  # bounded: a missing notice fails the test
        worker.join()
        assert not bob_changed.is_set()
    assert mailbox_events.changed(alice) == 0  # the listeners left with their block


def test_a_listener_whose_loop_closed_is_skipped_quietly() -> None:
    events = MailboxEvents()
    loop = asyncio.new_event_loop()
    stack = contextlib.ExitStack()

    async def enter() -> None:
        stack.enter_context(events.listen("/m"))

    loop.run_until_complete(enter())
    loop.close()  # its session is gone without leaving the block
    assert events.changed("/m") == 1  # no RuntimeError from the closed loop
    stack.close()
    assert events.changed("/m") == 0
