"""POST /v1/messages and GET /v1/messages/{id} against the real listener (mutual TLS), with curl and httpx.

The recipient decisions are the SMTP edge's (RCPT TO, ``mssgw domains check``); an accepted
message is in the queue (origin ``api``, the certificate's mailbox as auth identity) before the
202; the audit trail holds the same records as for SMTP, and nothing of the content.
"""

from __future__ import annotations

import json

from api_world import APP, BOB, SEC, ApiWorld, dumps, new_message
from sqlalchemy import select

from gateway.audit.models import AuditRecord


async def test_curl_submission_is_queued_before_202_and_followed(api: ApiWorld) -> None:
    status, headers, body = await api.curl("POST", "/v1/messages", body=dumps(new_message()),
                                           headers={"Content-Type": "application/json"})
    assert status == 202, body
    answer = json.loads(body)
    queue_id = answer["id"]
    assert headers["location"] == f"/v1/messages/{queue_id}"
    assert answer["recipients"] == [{"address": BOB, "accepted": True, "smtp_code": 250, "enhanced_status": "2.1.5",
                                     "rule": answer["recipients"][0]["rule"],
                                     "reason": answer["recipients"][0]["reason"]}]
    # Durable before the answer: the queue has it, from the API, as app@.
    info = api.gateway.store.get(queue_id)
    assert info["origin"] == "api" and info["auth_identity"] == APP and info["sender"] == APP
    data = api.gateway.store.read(queue_id)
    assert data.startswith(b"Received: from [127.0.0.1]") and f"with HTTPS id {queue_id}".encode() in data
    assert b"\r\nFrom: app@a.mssante.test\r\n" in data and b"Bonjour." in data
    assert answer["message_id"] and answer["message_id"].encode() in data

    async with api.client() as http:
        got = await http.get(f"/v1/messages/{queue_id}")
    assert got.status_code == 200
    state = got.json()
    assert state["id"] == queue_id and state["message_id"] == answer["message_id"]
    assert [(r["address"], r["state"], r["attempts"]) for r in state["recipients"]] == [(BOB, "queued", 0)]
    assert state["receipts"] == []


async def test_recipients_decided_as_at_rcpt_consumer_refused_with_reason(api: ApiWorld) -> None:
    async with api.client() as http:
        mixed = await http.post("/v1/messages", json=new_message(to=[BOB, "someone@gmail.com"],
                                                                 cc=["x@unknown-domain.example"]))
        assert mixed.status_code == 202
        answers = {r["address"]: r for r in mixed.json()["recipients"]}
        assert answers[BOB]["accepted"] is True
        gmail = answers["someone@gmail.com"]
        assert not gmail["accepted"] and (gmail["smtp_code"], gmail["enhanced_status"]) == (550, "5.7.1")
        assert "Consumer" in gmail["reason"] or "consumer" in gmail["reason"]
        assert answers["x@unknown-domain.example"]["accepted"] is False
        # Only the accepted recipient is queued.
        info = api.gateway.store.get(mixed.json()["id"])
        assert [r["address"] for r in info["recipient_states"]] == [BOB]

        none = await http.post("/v1/messages", json=new_message(to=["someone@gmail.com"]))
    assert none.status_code == 422
    assert none.headers["content-type"].startswith("application/problem+json")
    problem = none.json()
    assert (problem["smtp_code"], problem["enhanced_status"], problem["status"]) == (550, "5.7.1", 422)
    assert problem["rule"] == gmail["rule"] and problem["recipients"][0]["reason"] == gmail["reason"]
    assert problem["type"].startswith("urn:mssgw:problem:")


async def test_sender_must_be_own_or_delegated_mailbox(api: ApiWorld) -> None:
    async with api.client() as http:
        spoof = await http.post("/v1/messages", json=new_message(**{"from": BOB}))
        delegated = await http.post("/v1/messages", json=new_message(**{"from": SEC}))
    assert spoof.status_code == 403
    problem = spoof.json()
    assert (problem["smtp_code"], problem["enhanced_status"], problem["rule"]) == (550, "5.7.1", "sender-not-owned")
    assert delegated.status_code == 202, delegated.text
    assert api.gateway.store.get(delegated.json()["id"])["sender"] == SEC


async def test_audit_records_as_for_smtp_without_content(api: ApiWorld) -> None:
    secret = "SECRET-BODY-4242"
    async with api.client() as http:
        sent = await http.post("/v1/messages", json=new_message(subject=secret, text=secret,
                                                                to=[BOB, "someone@gmail.com"]))
    queue_id = sent.json()["id"]
    assert api.gateway.audit is not None
    await api.gateway.audit.flush()
    with api.gateway.sessions() as db:
        rows = list(db.scalars(select(AuditRecord).order_by(AuditRecord.seq)))
    kinds = [(r.event, r.outcome) for r in rows if r.actor == APP]
    assert ("mail", "accept") in kinds and ("rcpt", "accept") in kinds and ("rcpt", "refuse") in kinds
    accepted = [r for r in rows if r.event == "accept" and r.queue_id == queue_id]
    assert len(accepted) == 1 and accepted[0].recipient == BOB
    assert json.loads(accepted[0].detail or "{}")["origin"] == "api"
    for row in rows:
        assert secret not in " ".join(str(v) for v in vars(row).values())


async def test_message_of_another_mailbox_is_not_found(api: ApiWorld) -> None:
    async with api.client() as http:
        sent = await http.post("/v1/messages", json=new_message())
        queue_id = sent.json()["id"]
        missing = await http.get("/v1/messages/0123456789abcdef0123456789abcdef")
    async with api.client(api.certs.app) as http:
        mine = await http.get(f"/v1/messages/{queue_id}")
    assert missing.status_code == 404 and missing.json()["enhanced_status"] == "5.1.1"
    assert mine.status_code == 200
    # sec@ sends over SMTP in other tests; here the queue row of app@ is invisible to any other mailbox.
    info = api.gateway.store.get(queue_id)
    assert info["auth_identity"] == APP
