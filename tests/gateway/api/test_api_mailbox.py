"""Reading an applicative mailbox over the API, documents in submissions, and the event stream.

Mail is put into app@'s Maildir by the gateway's own local delivery (``MaildirDelivery.deliver``,
what the queue workers call); the API lists it, describes it (headers, verification, attachments,
health documents), returns the MIME with ``?raw=1`` and removes it. A mailbox delegated to app@
(sec@) may be read; bob@'s may not.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import zipfile
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import httpx
from api_world import APP, BOB, SEC, ApiWorld, new_message

from gateway.delivery.maildir import MaildirDelivery

NIR = "279035121518989"  # a test patient's NIR (key 89), with the test INS authority
PDF = b"%PDF-1.4\n% compte rendu\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"


def _incoming(subject: str = "Compte rendu", *, with_pdf: bool = True) -> bytes:
    msg = EmailMessage()
    msg["From"] = "doc@b.mssante.test"
    msg["To"] = APP
    msg["Subject"] = subject
    msg["Date"] = "Mon, 30 Nov 2026 10:00:00 +0100"
    msg["Message-ID"] = "<in-1@b.mssante.test>"
    msg["Authentication-Results"] = "localhost; smime=pass body.smime-identifier=doc@b.mssante.test"
    msg.set_content("Bonjour,\nle compte rendu est joint.\n")
    if with_pdf:
        msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="cr.pdf")
    return msg.as_bytes(policy=policy.SMTP)


async def test_list_describe_raw_and_delete(api: ApiWorld) -> None:
    maildir = MaildirDelivery(api.settings.mail_dir)
    name = maildir.deliver(APP, _incoming()).split(":")[0]
    async with api.client() as http:
        listed = await http.get(f"/v1/mailboxes/{APP}/messages")
        assert listed.status_code == 200
        entries = listed.json()["messages"]
        assert [(e["id"], e["subject"], e["from"]) for e in entries] == [(name, "Compte rendu", "doc@b.mssante.test")]
        since = entries[0]["received_at"]
        later = await http.get(f"/v1/mailboxes/{APP}/messages", params={"since": since})
        assert later.json()["messages"] == []

        parsed = (await http.get(f"/v1/mailboxes/{APP}/messages/{name}")).json()
        assert parsed["headers"]["Subject"] == "Compte rendu"
        assert parsed["verification"]["results"] == {"smime": "pass"}
        assert parsed["text"].startswith("Bonjour,")
        assert parsed["attachments"] == [{"filename": "cr.pdf", "content_type": "application/pdf", "size": len(PDF)}]
        assert parsed["documents"] is None and parsed["report"] is None

        raw = await http.get(f"/v1/mailboxes/{APP}/messages/{name}", params={"raw": "1"})
        assert raw.headers["content-type"].startswith("message/rfc822") and raw.content == _file(api, name)

        gone = await http.delete(f"/v1/mailboxes/{APP}/messages/{name}")
        again = await http.get(f"/v1/mailboxes/{APP}/messages/{name}")
        traversal = await http.get(f"/v1/mailboxes/{APP}/messages/..%2F..%2Fmssgw.toml")
    assert gone.status_code == 204 and again.status_code == 404
    assert traversal.status_code == 404
    assert maildir.folder_path(APP).joinpath("new").exists() and not list(maildir.folder_path(APP).glob("*/" + name + "*"))


def _file(api: ApiWorld, name: str) -> bytes:
    base = MaildirDelivery(api.settings.mail_dir).folder_path(APP)
    return next(p for p in (*base.glob("new/*"), *base.glob("cur/*")) if p.name.startswith(name)).read_bytes()


async def test_delegated_mailbox_readable_others_not(api: ApiWorld) -> None:
    MaildirDelivery(api.settings.mail_dir).deliver(SEC, _incoming("Pour le secretariat"))
    async with api.client() as http:
        delegated = await http.get(f"/v1/mailboxes/{SEC}/messages")
        foreign = await http.get(f"/v1/mailboxes/{BOB}/messages")
        bad = await http.get("/v1/mailboxes/not-an-address/messages")
    assert delegated.status_code == 200 and delegated.json()["messages"][0]["subject"] == "Pour le secretariat"
    assert foreign.status_code == 403 and foreign.json()["rule"] == "mailbox-not-owned"
    assert bad.status_code == 400


def _document(**patient: Any) -> dict[str, Any]:
    return {"pdf": base64.b64encode(PDF).decode(), "filename": "ordonnance.pdf", "loinc": "57833-6",
            "patient": {"ins": NIR, "ins_oid": "test", "family": "DUPONT", "given": "JEAN", "birth_date": "19790305",
                        "gender": "M", **patient}}


async def test_document_packaged_as_ihe_xdm_and_checked(api: ApiWorld) -> None:
    async with api.client() as http:
        sent = await http.post("/v1/messages", json=new_message(
            html="<p>Bonjour.</p>", documents=[_document()], receipt=True,
            attachments=[{"filename": "note.txt", "content_type": "text/plain",
                          "content": base64.b64encode(b"note").decode()}]))
        bad_ins = await http.post("/v1/messages", json=new_message(documents=[_document(ins="279035121518900")]))
        two = await http.post("/v1/messages", json=new_message(documents=[_document(), _document()]))
    assert sent.status_code == 202, sent.text
    data = api.gateway.store.read(sent.json()["id"])
    msg = message_from_bytes(data, policy=policy.default)
    assert msg["X-MSS-CODECDA"] == "57833-6" and msg["X-MSS-INS"] == "O"
    assert msg["Disposition-Notification-To"] == APP
    names = {p.get_filename(): p for p in msg.iter_attachments()}  # type: ignore[attr-defined]
    assert {"ordonnance.pdf", "IHE_XDM.ZIP", "note.txt"} <= set(names)
    with zipfile.ZipFile(io.BytesIO(names["IHE_XDM.ZIP"].get_content())) as package:
        assert any(n.upper().endswith("METADATA.XML") for n in package.namelist())
    assert NIR.encode() not in data.split(b"\r\n\r\n", 1)[0]  # the INS is in the package, not in a header
    assert msg.get_body(preferencelist=("html",)) is not None
    assert bad_ins.status_code == 400 and bad_ins.json()["errors"][0]["pointer"] == "/documents/0/patient/ins"
    assert NIR[:13] not in bad_ins.text
    assert two.status_code == 400 and two.json()["errors"][0]["pointer"] == "/documents"


async def _events(http: httpx.AsyncClient, wanted: int, out: list[tuple[str, dict[str, Any]]],
                  ready: asyncio.Event) -> None:  # fmt: skip
    async with http.stream("GET", "/v1/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = ""
        async for line in stream.aiter_lines():
            if line.startswith(": mssgw"):
                ready.set()
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
                if len(out) >= wanted:
                    return


async def test_event_stream_tells_new_mail_and_state_changes(api: ApiWorld) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    ready = asyncio.Event()
    async with api.client() as http:
        sent = await http.post("/v1/messages", json=new_message())
        queue_id = sent.json()["id"]
        reader = asyncio.create_task(_events(http, 2, events, ready))
        await asyncio.wait_for(ready.wait(), 20)
        name = MaildirDelivery(api.settings.mail_dir).deliver(APP, _incoming()).split(":")[0]
        store = api.gateway.store
        assert store is not None
        await asyncio.to_thread(store.delete, queue_id, reason="test", actor="admin")
        await asyncio.wait_for(reader, 20)
    kinds = {k: d for k, d in events}
    assert kinds["mailbox.message"]["id"] == name and kinds["mailbox.message"]["mailbox"] == APP
    assert kinds["message.state"]["id"] == queue_id and kinds["message.state"]["state"] == "deleted"
    assert kinds["message.state"]["address"] == BOB


async def _first_event(http: httpx.AsyncClient, headers: dict[str, str], ready: asyncio.Event) -> tuple[str, str, dict]:  # type: ignore[type-arg]
    async with http.stream("GET", "/v1/events", headers=headers) as stream:
        event_id = name = ""
        async for line in stream.aiter_lines():
            if line.startswith(": mssgw"):
                ready.set()
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                return event_id, name, json.loads(line[6:])
    raise AssertionError("the stream ended without an event")


async def test_event_stream_resumes_after_last_event_id(api: ApiWorld) -> None:
    maildir = MaildirDelivery(api.settings.mail_dir)
    async with api.client() as http:
        ready = asyncio.Event()
        reader = asyncio.create_task(_first_event(http, {}, ready))
        await asyncio.wait_for(ready.wait(), 20)
        first = maildir.deliver(APP, _incoming("premier")).split(":")[0]
        event_id, name, data = await asyncio.wait_for(reader, 20)
        assert (name, data["id"]) == ("mailbox.message", first)
        # Disconnected: a second message arrives; the reconnect names the last event it saw.
        second = maildir.deliver(APP, _incoming("second")).split(":")[0]
        again = asyncio.Event()
        _, name, data = await asyncio.wait_for(_first_event(http, {"Last-Event-ID": event_id}, again), 20)
    assert (name, data["id"], data["subject"]) == ("mailbox.message", second, "second")
