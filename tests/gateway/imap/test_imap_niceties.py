"""What mail clients rely on: special-use folders (RFC 6154), IDLE woken by delivery, private APPENDs."""

from __future__ import annotations

import asyncio
import imaplib
import os
import stat
import subprocess
import sys
import textwrap

import aioimaplib
import pytest
from conftest import ALICE, BOB, PASSWORD, Imap, lab_report

from gateway.imap import connection

SPECIAL = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}


def tls_login(imap: Imap, user: str = ALICE) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("localhost", imap.tls_port, ssl_context=imap.client_context(), timeout=10)
    client.login(user, PASSWORD)
    return client


def parse_list(lines: list[bytes]) -> dict[str, set[str]]:
    """``{folder: {attributes}}`` from LIST lines such as ``(\\HasNoChildren \\Sent) "/" Sent``."""
    out: dict[str, set[str]] = {}
    for line in lines:
        attrs, _, rest = line.decode().partition(") ")
        name = rest.split(" ", 1)[1].strip('"')
        out[name] = set(attrs.lstrip("(").split())
    return out


async def test_capability_and_list_name_the_special_use_folders(imap: Imap) -> None:
    def run() -> tuple[tuple[str, ...], dict[str, set[str]], dict[str, set[str]], dict[str, set[str]],
                       dict[str, set[str]]]:  # fmt: skip
        client = tls_login(imap)
        try:
            typ, cap_lines = client.capability()
            caps = tuple(cap_lines[0].decode().split())
            typ, plain = client.list()
            assert typ == "OK"
            typ, selected = client._simple_command("LIST", "(SPECIAL-USE)", '""', '"*"')
            assert typ == "OK"
            only = client._untagged_response(typ, selected, "LIST")[1]
            typ, returned = client._simple_command("LIST", '""', '"*"', "RETURN", "(SPECIAL-USE)")
            assert typ == "OK"
            ret = client._untagged_response(typ, returned, "LIST")[1]
            typ, lsub = client.lsub()
            assert typ == "OK"
            return caps, parse_list(plain), parse_list(only), parse_list(ret), parse_list(lsub)
        finally:
            client.logout()

    caps, plain, only, ret, lsub = await asyncio.to_thread(run)
    assert "SPECIAL-USE" in caps
    for name, attr in SPECIAL.items():
        assert attr in plain[name], (name, plain[name])
        assert attr in ret[name]
    assert not any(a in plain["INBOX"] for a in SPECIAL.values())
    assert set(only) == set(SPECIAL)  # the selection option lists the special-use folders only
    assert not any(a in attrs for attrs in lsub.values() for a in SPECIAL.values())  # LSUB is RFC 3501's


async def test_unsupported_list_option_is_refused_and_a_user_folder_gets_no_attribute(imap: Imap) -> None:
    def run() -> tuple[str, dict[str, set[str]]]:
        client = tls_login(imap)
        try:

            try:
                client._simple_command("LIST", "(REMOTE)", '""', '"*"')
                refused = "accepted"
            except imaplib.IMAP4.error as exc:
                refused = str(exc)
            assert client.create("Sent/Archives")[0] == "OK"
            typ, lines = client.list()
            assert typ == "OK"
            return refused, parse_list(lines)
        finally:
            client.logout()

    refused, listed = await asyncio.to_thread(run)
    assert "BAD" in refused or "LIST" in refused, refused
    assert "\\Sent" in listed["Sent"] and "\\HasChildren" in listed["Sent"]
    assert not any(a in listed["Sent/Archives"] for a in SPECIAL.values())


async def _idle_until_exists(client: aioimaplib.IMAP4_SSL, count: int) -> list[bytes]:
    pushed: list[bytes] = []
    while not any(f"{count} EXISTS".encode() in line for line in pushed):  # each wait bounded by its timeout
        push = await client.wait_server_push(timeout=10)
        pushed += [line for line in push if isinstance(line, bytes)] if isinstance(push, list) else []
    return pushed


async def _idling(imap: Imap, user: str = ALICE) -> tuple[aioimaplib.IMAP4_SSL, asyncio.Future[object]]:
    client = aioimaplib.IMAP4_SSL("localhost", imap.tls_port, ssl_context=imap.client_context(), timeout=10)
    await client.wait_hello_from_server()
    assert (await client.login(user, PASSWORD)).result == "OK"
    assert (await client.select("INBOX")).result == "OK"
    idle = await client.idle_start(timeout=60)
    # The first read of the folder happens as IDLE starts; the "+ idling" continuation is read
    # by aioimaplib before idle_start returns, so from here on only a change produces a push.
    return client, idle


async def test_idle_is_woken_by_a_delivery_without_polling(imap: Imap, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback re-read is pushed an hour away: only the delivery's notice can wake the session."""
    monkeypatch.setattr(connection, "IDLE_FALLBACK_SECONDS", 3600.0)
    client, idle = await _idling(imap)
    await asyncio.to_thread(imap.delivery.deliver, ALICE.upper(), lab_report("urgent"))  # from a worker thread
    pushed = await _idle_until_exists(client, 1)
    client.idle_done()
    assert (await asyncio.wait_for(idle, 10)).result == "OK"
    assert b"1 EXISTS" in pushed
    await client.logout()


async def test_idle_is_woken_by_another_sessions_append_and_not_by_another_account(
    imap: Imap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "IDLE_FALLBACK_SECONDS", 3600.0)
    client, idle = await _idling(imap)
    bob_client, bob_idle = await _idling(imap, BOB)

    def append() -> None:
        other = tls_login(imap)
        try:
            typ, _ = other.append("INBOX", "", imaplib.Time2Internaldate(0), lab_report("from a second client"))
            assert typ == "OK"
        finally:
            other.logout()

    await asyncio.to_thread(append)
    await _idle_until_exists(client, 1)
    client.idle_done()
    assert (await asyncio.wait_for(idle, 10)).result == "OK"
    await client.logout()
    # Bob's session heard nothing: his mailbox did not change (the IDLE ends with no EXISTS).
    bob_client.idle_done()
    assert (await asyncio.wait_for(bob_idle, 10)).result == "OK"
    status = await bob_client.status("INBOX", "(MESSAGES)")
    assert any(b"MESSAGES 0" in line for line in status.lines if isinstance(line, bytes))
    await bob_client.logout()


async def test_idle_falls_back_to_polling_for_another_process(imap: Imap, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery by another process (no in-process notice) is still seen, by the fallback re-read."""
    monkeypatch.setattr(connection, "IDLE_FALLBACK_SECONDS", 0.2)
    client, idle = await _idling(imap)
    script = textwrap.dedent(f"""
        import sys
        from gateway.delivery.maildir import MaildirDelivery
        MaildirDelivery({str(imap.settings.mail_dir)!r}).deliver({ALICE!r}, sys.stdin.buffer.read())
    """)
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], input=lab_report("other process"),
                            check=True, timeout=60)  # fmt: skip
    await _idle_until_exists(client, 1)
    client.idle_done()
    assert (await asyncio.wait_for(idle, 10)).result == "OK"
    await client.logout()


async def test_append_stores_the_message_0600_whatever_the_umask(imap: Imap) -> None:
    draft = lab_report("brouillon")

    def run() -> None:
        client = tls_login(imap)
        try:
            assert client.append("Drafts", "(\\Draft)", None, draft)[0] == "OK"
        finally:
            client.logout()

    old = os.umask(0o022)
    try:
        await asyncio.to_thread(run)
    finally:
        os.umask(old)
    drafts = imap.delivery.folder_path(ALICE, "Drafts")
    files = [p for sub in ("new", "cur") for p in (drafts / sub).iterdir()]
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert files[0].read_bytes() == draft
