"""The IMAP service end to end: imaplib, aioimaplib and curl against a real server over real TLS."""

from __future__ import annotations

import asyncio
import imaplib
import re

import aioimaplib
from conftest import ALICE, BOB, GONE, MAX_FAILURES, ORG_PASSWORD, PASSWORD, SECRETARIAT, Imap, lab_report
from sqlalchemy import select

from gateway.audit.models import AuditRecord

FOLDERS = {"INBOX", "Sent", "Drafts", "Trash", "Junk"}


def starttls_login(imap: Imap, user: str, password: str = PASSWORD) -> imaplib.IMAP4:
    client = imaplib.IMAP4("localhost", imap.starttls_port, timeout=10)
    try:
        client.starttls(imap.client_context())
        client.login(user, password)
    except BaseException:
        client.shutdown()
        raise
    return client


def tls_login(imap: Imap, user: str, password: str = PASSWORD) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("localhost", imap.tls_port, ssl_context=imap.client_context(), timeout=10)
    try:
        client.login(user, password)
    except BaseException:
        client.shutdown()
        raise
    return client


def folder_names(client: imaplib.IMAP4, command: str = "list") -> set[str]:
    typ, lines = getattr(client, command)()
    assert typ == "OK"
    return {re.search(rb'"([^"]*)"$|(\S+)$', line).group(0).strip(b'"').decode() for line in lines}  # type: ignore[union-attr]


async def test_login_refused_in_clear_text(imap: Imap) -> None:
    def attempt() -> tuple[list[bytes], str]:
        client = imaplib.IMAP4("localhost", imap.starttls_port, timeout=10)
        try:
            caps = list(client.capabilities)
            try:
                client.login(ALICE, PASSWORD)
            except imaplib.IMAP4.error as exc:
                return caps, str(exc)
            return caps, "logged in"
        finally:
            client.shutdown()

    caps, result = await asyncio.to_thread(attempt)
    assert "LOGINDISABLED" in caps and "STARTTLS" in caps
    assert not any(c.startswith("AUTH=") for c in caps)
    assert "LOGIN is disabled" in result

    # The same refusal for AUTHENTICATE PLAIN in clear text.
    reader, writer = await asyncio.open_connection("127.0.0.1", imap.starttls_port)
    await reader.readline()
    writer.write(b"a1 AUTHENTICATE PLAIN\r\n")
    assert (await reader.readline()).startswith(b"a1 NO")
    writer.close()
    await writer.wait_closed()


async def test_starttls_and_implicit_tls_login_list_and_capabilities(imap: Imap) -> None:
    def session(tls: bool) -> tuple[set[str], set[str], tuple[str, ...]]:
        client = tls_login(imap, ALICE) if tls else starttls_login(imap, ALICE)
        try:
            caps = tuple(client.capability()[1][0].decode().split())
            return folder_names(client), folder_names(client, "lsub"), caps
        finally:
            client.logout()

    for tls in (False, True):
        listed, subscribed, caps = await asyncio.to_thread(session, tls)
        assert listed == FOLDERS
        assert subscribed == FOLDERS
        assert {"IDLE", "UIDPLUS", "MOVE"} <= set(caps)
    # Mixed-case login: the same mailbox.
    listed, _, _ = await asyncio.to_thread(lambda: (folder_names(c := tls_login(imap, ALICE.upper())), None, c.logout()))
    assert listed == FOLDERS


async def test_fetch_of_a_delivered_message_is_byte_identical(imap: Imap) -> None:
    raw = lab_report()
    imap.delivery.deliver(ALICE, raw)

    def read() -> dict[str, bytes]:
        client = starttls_login(imap, ALICE)
        try:
            typ, data = client.select("INBOX")
            assert typ == "OK" and data == [b"1"]
            out: dict[str, bytes] = {}
            for item in ("BODY.PEEK[]", "ENVELOPE", "BODYSTRUCTURE", "BODY.PEEK[HEADER.FIELDS (AUTHENTICATION-RESULTS)]",
                         "FLAGS"):
                typ, resp = client.uid("FETCH", "1", f"({item})")
                assert typ == "OK"
                out[item] = resp[0][1] if isinstance(resp[0], tuple) else resp[0]
            typ, resp = client.uid("SEARCH", None, 'SUBJECT "biologie"')  # type: ignore[arg-type]
            out["search"] = resp[0]
            return out
        finally:
            client.logout()

    out = await asyncio.to_thread(read)
    assert out["BODY.PEEK[]"] == raw
    assert b"smime=pass" in out["BODY.PEEK[HEADER.FIELDS (AUTHENTICATION-RESULTS)]"]
    assert b'"application" "pdf"' in out["BODYSTRUCTURE"].lower().replace(b"APPLICATION", b"application")
    assert b"Compte rendu biologie" in out["ENVELOPE"]
    assert b"\\Seen" not in out["FLAGS"]  # PEEK leaves it unread
    assert out["search"] == b"1"


async def test_flags_persist_across_reconnection_copy_move_expunge(imap: Imap) -> None:
    raws = [lab_report(f"message {n}") for n in range(3)]
    for raw in raws:
        imap.delivery.deliver(ALICE, raw)

    def first() -> None:
        client = tls_login(imap, ALICE)
        client.select("INBOX")
        assert client.uid("STORE", "1", "+FLAGS", r"(\Seen \Flagged)")[0] == "OK"
        assert client.uid("COPY", "2", "Trash")[0] == "OK"
        assert client.uid("MOVE", "3", "Junk")[0] == "OK"
        client.logout()

    def second() -> tuple[bytes, int, int, int]:
        client = starttls_login(imap, ALICE)
        try:
            client.select("INBOX")
            flags = client.uid("FETCH", "1", "(FLAGS)")[1][0]
            inbox = int(client.select("INBOX")[1][0])
            trash = int(client.select("Trash")[1][0])
            copied = client.uid("FETCH", "1", "(BODY.PEEK[])")[1][0][1]  # type: ignore[index]
            assert copied == raws[1]  # COPY keeps the bytes
            client.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
            client.expunge()
            trash_after = int(client.select("Trash")[1][0])
            junk = int(client.status("Junk", "(MESSAGES)")[1][0].split()[-1].strip(b")"))
            assert trash == 1
            return flags, inbox, trash_after, junk
        finally:
            client.logout()

    await asyncio.to_thread(first)
    flags, inbox, trash_after, junk = await asyncio.to_thread(second)
    assert b"\\Seen" in flags and b"\\Flagged" in flags
    assert inbox == 2  # message 3 moved out
    assert trash_after == 0
    assert junk == 1


async def test_append_to_sent_and_drafts(imap: Imap) -> None:
    sent = lab_report("envoi", to=BOB)

    def run() -> tuple[bytes, bytes]:
        client = tls_login(imap, ALICE)
        try:
            assert client.append("Sent", r"(\Seen)", None, sent)[0] == "OK"  # type: ignore[arg-type]
            assert client.append("Drafts", r"(\Draft)", None, b"Subject: brouillon\r\n\r\n...\r\n")[0] == "OK"  # type: ignore[arg-type]
            client.select("Sent", readonly=True)
            body = client.uid("FETCH", "1", "(BODY.PEEK[])")[1][0][1]  # type: ignore[index]
            flags = client.uid("FETCH", "1", "(FLAGS)")[1][0]
            return body, flags
        finally:
            client.logout()

    body, flags = await asyncio.to_thread(run)
    assert body == sent
    assert b"\\Seen" in flags
    sent_dir = imap.delivery.mailbox_path(ALICE) / ".Sent"
    assert [p.read_bytes() for sub in ("new", "cur") for p in (sent_dir / sub).iterdir()] == [sent]


async def test_idle_is_notified_of_a_delivery(imap: Imap) -> None:
    client = aioimaplib.IMAP4_SSL("localhost", imap.tls_port, ssl_context=imap.client_context(), timeout=10)
    await client.wait_hello_from_server()
    assert (await client.login(ALICE, PASSWORD)).result == "OK"
    assert (await client.select("INBOX")).result == "OK"
    idle = await client.idle_start(timeout=10)
    imap.delivery.deliver(ALICE, lab_report("urgent"))
    pushed: list[bytes] = []
    while not any(b"EXISTS" in line for line in pushed):  # each wait is bounded; the loop ends on EXISTS
        push = await client.wait_server_push(timeout=5)
        pushed += [line for line in push if isinstance(line, bytes)] if isinstance(push, list) else []
    client.idle_done()
    assert (await asyncio.wait_for(idle, 5)).result == "OK"
    assert b"1 EXISTS" in pushed
    fetched = await client.uid("fetch", "1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert any(b"urgent" in line for line in fetched.lines if isinstance(line, bytes | bytearray))
    await client.logout()


async def test_wrong_password_refused_then_locked_and_audited(imap: Imap) -> None:
    def attempt(password: str) -> str:
        client = imaplib.IMAP4_SSL("localhost", imap.tls_port, ssl_context=imap.client_context(), timeout=10)
        try:
            client.login(BOB, password)
            return "OK"
        except imaplib.IMAP4.error as exc:
            return str(exc)
        finally:
            client.shutdown()

    first = await asyncio.to_thread(attempt, "wrong password!!")
    assert "AUTHENTICATIONFAILED" in first
    for _ in range(MAX_FAILURES - 1):
        await asyncio.to_thread(attempt, "wrong password!!")
    locked = await asyncio.to_thread(attempt, PASSWORD)  # even the right password, while locked
    assert "UNAVAILABLE" in locked
    await imap.audit.flush()
    with imap.factory() as session:
        rows = session.scalars(select(AuditRecord).where(AuditRecord.event == "auth")).all()
    rules = [r.rule for r in rows if r.actor == BOB]
    assert rules.count("bad-credentials") == MAX_FAILURES and rules[-1] == "locked"
    assert all('"imap"' in (r.detail or "") for r in rows)


async def test_deactivated_mailbox_and_unknown_user_refused(imap: Imap) -> None:
    def attempt(user: str) -> str:
        try:
            tls_login(imap, user).logout()
            return "OK"
        except imaplib.IMAP4.error as exc:
            return str(exc)

    assert "AUTHENTICATIONFAILED" in await asyncio.to_thread(attempt, GONE)
    assert "AUTHENTICATIONFAILED" in await asyncio.to_thread(attempt, f"nobody@{imap.settings.domains[0]}")


async def test_org_mailbox_uses_its_own_credentials_and_delegate_sees_only_its_own(imap: Imap) -> None:
    imap.delivery.deliver(SECRETARIAT, lab_report("pour le secretariat", to=SECRETARIAT))

    def run() -> tuple[set[str], int, int]:
        org = tls_login(imap, SECRETARIAT, ORG_PASSWORD)
        org_count = int(org.select("INBOX")[1][0])
        org.logout()
        delegate = tls_login(imap, ALICE)
        names = folder_names(delegate)
        own = int(delegate.select("INBOX")[1][0])
        delegate.logout()
        return names, org_count, own

    names, org_count, own = await asyncio.to_thread(run)
    assert org_count == 1
    assert names == FOLDERS and own == 0


async def test_one_user_cannot_reach_another_users_folders(imap: Imap) -> None:
    imap.delivery.deliver(BOB, lab_report("pour bob", to=BOB))
    # Usernames with path tricks are not accounts; they never open a Maildir.
    tricks = ["../bob.durand@a.mssante.test", f"{ALICE}/../../{BOB}", "../" + BOB, BOB + "\x00"]

    def run() -> list[str]:
        results = []
        for user in tricks:
            try:
                tls_login(imap, user).logout()
                results.append("OK")
            except imaplib.IMAP4.error as exc:
                results.append(str(exc))
            imap.authenticator.throttle.success("ip:127.0.0.1")  # the tricks all came from this test's address
        client = tls_login(imap, ALICE)
        try:
            for name in ['"/"', '"../bob.durand"', '"../../a.mssante.test/bob.durand"', '"./"', '"Sent/../.."']:
                typ, _ = client.select(name)
                results.append(f"select {name} {typ}")
                typ, _ = client.create(name)
                results.append(f"create {name} {typ}")
            results.append(f"inbox {client.select('INBOX')[1][0].decode()}")
        finally:
            client.logout()
        return results

    results = await asyncio.to_thread(run)
    assert all(r != "OK" for r in results[: len(tricks)]), results  # NUL: BAD from the parser; others: NO
    assert all(r.endswith(" NO") for r in results[len(tricks) : -1]), results
    assert results[-1] == "inbox 0"
    domain_dir = imap.delivery.mailbox_path(ALICE).parent
    assert sorted(p.name for p in domain_dir.iterdir()) == ["alice.martin", "bob.durand"]


async def _curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", "20", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


async def test_curl_as_an_independent_client(imap: Imap) -> None:
    raw = lab_report()
    imap.delivery.deliver(ALICE, raw)
    ca = str(imap.ca)
    user = f"{ALICE}:{PASSWORD}"
    code, listing, err = await _curl("--ssl-reqd", "--cacert", ca, "--user", user,
                                     f"imap://localhost:{imap.starttls_port}/")
    assert code == 0, err
    assert {"INBOX", "Sent", "Drafts", "Trash", "Junk"} <= {line.split()[-1].strip('"') for line in listing.splitlines()}
    code, body, err = await _curl("--cacert", ca, "--user", user, f"imaps://localhost:{imap.tls_port}/INBOX;UID=1")
    assert code == 0, err
    assert body.encode() == raw
    # curl without TLS on the STARTTLS port cannot log in.
    code, _, err = await _curl("--user", user, f"imap://localhost:{imap.starttls_port}/")
    assert code != 0


async def test_authenticate_plain_after_tls_and_foreign_authzid_refused(imap: Imap) -> None:
    def run(authzid: str) -> str:
        client = imaplib.IMAP4_SSL("localhost", imap.tls_port, ssl_context=imap.client_context(), timeout=10)
        try:
            typ, _ = client.authenticate("PLAIN", lambda _: f"{authzid}\0{ALICE}\0{PASSWORD}".encode())
            client.select("INBOX")
            client.logout()
            return typ
        except imaplib.IMAP4.error as exc:
            client.shutdown()
            return str(exc)

    assert await asyncio.to_thread(run, "") == "OK"
    assert await asyncio.to_thread(run, ALICE.upper()) == "OK"
    assert "AUTHORIZATIONFAILED" in await asyncio.to_thread(run, BOB)
    inbox = imap.delivery.mailbox_path(ALICE)
    assert (inbox / "dovecot-uidlist").is_file()
    assert not [p for p in inbox.iterdir() if p.name.startswith(".tmp-")]


async def test_more_idling_clients_than_pool_threads_and_the_service_still_answers(imap: Imap) -> None:
    from gateway.imap.server import IO_THREADS

    async def idler() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("localhost", imap.tls_port, ssl=imap.client_context())
        await reader.readline()
        writer.write(f'a LOGIN {BOB} "{PASSWORD}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
        while not (await reader.readline()).startswith(b"+ "):
            pass
        return reader, writer

    idlers = await asyncio.gather(*(idler() for _ in range(IO_THREADS + 4)))
    imap.delivery.deliver(ALICE, lab_report())

    def other_user() -> int:
        client = tls_login(imap, ALICE)
        try:
            return int(client.select("INBOX")[1][0])
        finally:
            client.logout()

    assert await asyncio.wait_for(asyncio.to_thread(other_user), 20) == 1
    for reader, writer in idlers:
        writer.write(b"DONE\r\n")
        while not (await reader.readline()).startswith(b"c "):
            pass
        writer.close()
        await writer.wait_closed()
