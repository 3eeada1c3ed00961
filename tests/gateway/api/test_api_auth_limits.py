"""Who may use the API and how much: client certificates as on submission, idempotency, limits, bad input.

Every refusal is an RFC 9457 problem (``application/problem+json``) with the SMTP edge's reply
code, enhanced status and rule; nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from api_world import APP, BOB, ApiWorld, dumps, new_message, prepare_home, started_api

from gateway.api.server import ApiServer


def _problem(response: httpx.Response) -> dict:  # type: ignore[type-arg]
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = response.json()
    assert body["status"] == response.status_code and body["type"].startswith("urn:mssgw:problem:")
    assert "Traceback" not in response.text
    return body  # type: ignore[no-any-return]


async def test_without_certificate_refused(api: ApiWorld) -> None:
    async with httpx.AsyncClient(base_url=api.base, verify=api.context(None)) as http:
        got = await http.post("/v1/messages", json=new_message())
        doc = await http.get("/v1/openapi.json")  # the description is public
    problem = _problem(got)
    assert (got.status_code, problem["smtp_code"], problem["enhanced_status"]) == (403, 530, "5.7.0")
    assert doc.status_code == 200


@pytest.mark.parametrize(("who", "rule", "words"), [
    ("app2", "certificate-revoked", "revoked"),
    ("dr", "certificate-certificate-not-for-software", "APP and ORG"),
    ("stranger", "certificate-unknown-certificate", "not registered"),
])
async def test_revoked_non_software_and_unregistered_certificates_refused(api: ApiWorld, who: str, rule: str,
                                                                          words: str) -> None:
    async with api.client(getattr(api.certs, who)) as http:
        got = await http.post("/v1/messages", json=new_message(**{"from": f"{who}@a.mssante.test"}))
    problem = _problem(got)
    assert got.status_code == 403 and problem["rule"] == rule and words in problem["detail"]
    assert (problem["smtp_code"], problem["enhanced_status"]) == (530, "5.7.0")
    assert api.gateway.store.list() == []


async def test_certificate_of_an_untrusted_ca_fails_the_handshake(api: ApiWorld) -> None:
    async with api.client(api.certs.foreign) as http:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await http.post("/v1/messages", json=new_message())
    # curl (OpenSSL) sees the same refusal.
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--resolve", f"localhost:{api.port}:127.0.0.1", "--cacert", str(api.ca),
        "--cert", str(api.certs.foreign.cert), "--key", str(api.certs.foreign.key), f"{api.base}/v1/messages/x",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode != 0 and err


async def test_idempotent_retry_returns_first_answer_and_queues_once(api: ApiWorld) -> None:
    body = new_message(text="Ordonnance.\n")
    async with api.client() as http:
        first = await http.post("/v1/messages", json=body, headers={"Idempotency-Key": "rx-2026-0001"})
        again = await http.post("/v1/messages", content=json.dumps(body, indent=2),
                                headers={"Idempotency-Key": "rx-2026-0001", "Content-Type": "application/json"})
        other = await http.post("/v1/messages", json={**body, "text": "Autre.\n"},
                                headers={"Idempotency-Key": "rx-2026-0001"})
        fresh = await http.post("/v1/messages", json=body, headers={"Idempotency-Key": "rx-2026-0002"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert len(api.gateway.store.list()) == 2  # the first and the one under a new key
    problem = _problem(other)
    assert other.status_code == 422 and problem["rule"] == "idempotency-key-reused"
    assert fresh.json()["id"] != first.json()["id"]
    # curl retrying with the same key gets the same answer too.
    status, headers, raw = await api.curl("POST", "/v1/messages", body=dumps(body),
                                          headers={"Content-Type": "application/json", "Idempotency-Key": "rx-2026-0001"})
    assert status == 202 and json.loads(raw) == first.json() and headers["idempotency-key"] == "rx-2026-0001"


async def test_concurrent_retries_with_one_key_queue_once(api: ApiWorld) -> None:
    async with api.client() as http:
        answers = await asyncio.gather(*(http.post("/v1/messages", json=new_message(),
                                                   headers={"Idempotency-Key": "same"}) for _ in range(6)))
    ok = [a for a in answers if a.status_code == 202]
    assert ok and {a.json()["id"] for a in ok} == {ok[0].json()["id"]}
    assert all(a.status_code in (202, 409) for a in answers)
    for busy in (a for a in answers if a.status_code == 409):
        assert _problem(busy)["rule"] == "idempotency-key-in-progress" and busy.headers["retry-after"]
    assert len(api.gateway.store.list()) == 1


@pytest.mark.parametrize(("content", "ctype", "status", "rule"), [
    (b"{not json", "application/json", 400, "json-malformed"),
    (b"[1, 2]", "application/json", 400, "json-malformed"),
    (b"\xff\xfe", "application/json", 400, "json-malformed"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "json-malformed"),
    (b"from=a", "application/x-www-form-urlencoded", 415, "media-type"),
])
async def test_malformed_bodies_get_problems(api: ApiWorld, content: bytes, ctype: str, status: int,
                                             rule: str) -> None:
    async with api.client() as http:
        got = await http.post("/v1/messages", content=content, headers={"Content-Type": ctype})
    assert got.status_code == status and _problem(got)["rule"] == rule


async def test_wrong_types_name_each_field(api: ApiWorld) -> None:
    body = {"from": 42, "to": "not an address", "cc": [BOB, {"x": 1}], "subject": "a\r\nBcc: evil@x.example",
            "receipt": "yes", "attachments": [{"filename": "a.pdf", "content": "%%%"}], "extra": 1}
    async with api.client() as http:
        got = await http.post("/v1/messages", json=body)
    problem = _problem(got)
    assert got.status_code == 400 and (problem["smtp_code"], problem["enhanced_status"]) == (501, "5.5.4")
    pointers = {e["pointer"] for e in problem["errors"]}
    assert pointers == {"/from", "/to/0", "/cc/1", "/subject", "/receipt", "/attachments/0/content", "/extra"}
    assert api.gateway.store.list() == []


async def test_oversized_body_refused_before_reading(api: ApiWorld) -> None:
    limit = api.settings.limits.max_message_size  # 200 000 in the test settings
    big = base64.b64encode(b"x" * (limit * 2)).decode()
    async with api.client() as http:
        got = await http.post("/v1/messages", json=new_message(attachments=[
            {"filename": "big.bin", "content_type": "application/octet-stream", "content": big}]))
        # Just over the message limit once composed, under the request limit: refused the same way.
        near = base64.b64encode(b"y" * (limit - 1000)).decode()
        composed = await http.post("/v1/messages", json=new_message(attachments=[
            {"filename": "n.bin", "content_type": "application/octet-stream", "content": near}]))
    for response in (got, composed):
        problem = _problem(response)
        assert response.status_code == 413 and (problem["smtp_code"], problem["enhanced_status"]) == (552, "5.3.4")
    # Chunked (no Content-Length): the reader stops at the limit too.
    status, _, raw = await api.curl("POST", "/v1/messages", body=b'{"text": "' + b"z" * (limit * 2) + b'"}',
                                    headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert status == 413 and json.loads(raw)["enhanced_status"] == "5.3.4"
    assert api.gateway.store.list() == []


async def test_unknown_routes_and_methods_are_problems(api: ApiWorld) -> None:
    async with api.client() as http:
        nothing = await http.get("/v1/nothing")
        wrong = await http.put("/v1/messages")
        bad_since = await http.get(f"/v1/mailboxes/{APP}/messages", params={"since": "yesterday"})
    assert nothing.status_code == 404 and _problem(nothing)["rule"] == "no-such-endpoint"
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"] and _problem(wrong)
    assert bad_since.status_code == 400 and _problem(bad_since)["rule"] == "since-malformed"


async def test_openapi_document_covers_every_route(api: ApiWorld) -> None:
    async with api.client() as http:
        doc = (await http.get("/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    server = api.gateway.api
    assert isinstance(server, ApiServer)
    served = {(r.method.lower(), r.resource.canonical) for r in server.app.router.routes()  # type: ignore[union-attr]
              if r.method != "HEAD"}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented


async def test_rate_per_certificate(sqlite_home, api_certs) -> None:  # type: ignore[no-untyped-def]
    prepare_home(sqlite_home, api_certs, {"api": {"burst": 3, "rate_per_minute": 1}})
    async with started_api(sqlite_home, api_certs) as world:
        async with world.client() as http:
            answers = [await http.get("/v1/messages/0123456789abcdef0123456789abcdef") for _ in range(4)]
        async with world.client(world.certs.app2) as other:  # another certificate has its own bucket
            theirs = await other.get("/v1/messages/0123456789abcdef0123456789abcdef")
    assert [a.status_code for a in answers] == [404, 404, 404, 429]
    problem = _problem(answers[3])
    assert problem["rule"] == "rate-limit" and int(answers[3].headers["retry-after"]) >= 1
    assert theirs.status_code == 403  # refused for its revocation, not for app@'s rate




async def test_submission_and_idempotency_on_each_database(api_any_db: ApiWorld) -> None:
    api = api_any_db
    async with api.client() as http:
        first = await http.post("/v1/messages", json=new_message(), headers={"Idempotency-Key": "k-db"})
        again = await http.post("/v1/messages", json=new_message(), headers={"Idempotency-Key": "k-db"})
        state = await http.get(f"/v1/messages/{first.json()['id']}")
    assert first.status_code == again.status_code == 202 and again.json() == first.json()
    assert state.json()["recipients"][0]["state"] == "queued"
    assert len(api.gateway.store.list()) == 1


async def test_refused_certificates_are_throttled_and_checked_once(sqlite_home, api_certs) -> None:  # type: ignore[no-untyped-def]
    prepare_home(sqlite_home, api_certs, {"api": {"burst": 3, "rate_per_minute": 1}})
    async with started_api(sqlite_home, api_certs) as world:
        async with world.client(world.certs.app2) as revoked:
            refused = [await revoked.get("/v1/messages/0123456789abcdef0123456789abcdef") for _ in range(4)]
        async with httpx.AsyncClient(base_url=world.base, verify=world.context(None)) as anonymous:
            bare = [await anonymous.get("/v1/messages/0123456789abcdef0123456789abcdef") for _ in range(4)]
        assert world.gateway.audit is not None
        await world.gateway.audit.flush()
        with world.gateway.sessions() as db:  # type: ignore[misc]
            from sqlalchemy import select

            from gateway.audit.models import AuditRecord

            logins = [r for r in db.scalars(select(AuditRecord)) if r.event == "login" and r.outcome == "refuse"]
    assert [r.status_code for r in refused] == [403, 403, 403, 429]
    assert [r.status_code for r in bare] == [403, 403, 403, 429]
    assert len(logins) == 1  # the revoked certificate was looked up once, its refusal remembered
