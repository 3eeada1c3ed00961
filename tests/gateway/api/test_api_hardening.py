"""Input an outside tester found the API mishandled: lone surrogates, repeated JSON members and headers,
unbounded event streams, and client bytes reaching the log through aiohttp's own parser errors.

Each case goes through the real TLS listener; every refusal is an RFC 9457 problem without a traceback.
"""

from __future__ import annotations

import httpx
import pytest
from api_world import APP, BOB, ApiWorld

HEAD = f'"from":"{APP}","to":["{BOB}"]'.encode()


def _problem(response: httpx.Response) -> dict:  # type: ignore[type-arg]
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = response.json()
    assert body["status"] == response.status_code and "Traceback" not in response.text
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(("extra", "pointer"), [
    (rb'"text":"\ud800"', "/text"),
    (rb'"html":"ok \udfff"', "/html"),
    (rb'"text":"ok","subject":"\ud800"', "/subject"),
    (rb'"text":"ok","attachments":[{"filename":"\ud800.pdf","content":"aGVsbG8="}]', "/attachments/0/filename"),
    (rb'"text":"ok","documents":[{"pdf":"aGVsbG8=","loinc":"11488-4","patient":{"ins":"1","given":"\udc00"}}]',
     "/documents/0/patient/given"),
    (rb'"text":"ok","x\ud800/y":1', "/x\ufffd~1y"),
])
async def test_lone_surrogate_is_a_400_naming_the_field(api: ApiWorld, extra: bytes, pointer: str) -> None:
    async with api.client() as http:
        got = await http.post("/v1/messages", content=b"{" + HEAD + b"," + extra + b"}",
                              headers={"Content-Type": "application/json"})
    problem = _problem(got)
    assert got.status_code == 400 and "retry-after" not in got.headers
    assert (problem["smtp_code"], problem["enhanced_status"]) == (501, "5.5.4")
    assert pointer in [e["pointer"] for e in problem["errors"]]
    assert api.gateway.store.list() == []


async def test_duplicate_json_member_is_refused(api: ApiWorld) -> None:
    body = b'{"from":"%s","from":"sec@a.mssante.test","to":["%s"],"text":"x"}' % (APP.encode(), BOB.encode())
    nested = b'{' + HEAD + b',"text":"x","attachments":[{"filename":"a","filename":"b","content":""}]}'
    async with api.client() as http:
        got = [await http.post("/v1/messages", content=b, headers={"Content-Type": "application/json"})
               for b in (body, nested)]
    for answer in got:
        problem = _problem(answer)
        assert answer.status_code == 400 and problem["rule"] == "json-duplicate-member"
    assert "from" in got[0].json()["detail"] and "filename" in got[1].json()["detail"]
    assert api.gateway.store.list() == []


async def test_two_idempotency_keys_are_refused(api: ApiWorld) -> None:
    body = b"{" + HEAD + b',"text":"x"}'
    async with api.client() as http:
        got = await http.post("/v1/messages", content=body, headers=[
            ("Content-Type", "application/json"), ("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-2")])
        one = await http.post("/v1/messages", content=body, headers=[
            ("Content-Type", "application/json"), ("Idempotency-Key", "k-1")])
    problem = _problem(got)
    assert got.status_code == 400 and problem["rule"] == "idempotency-key-malformed" and "once" in problem["detail"]
    assert one.status_code == 202 and len(api.gateway.store.list()) == 1
