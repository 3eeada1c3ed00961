"""A message submitted over the HTTP API reaches the peer operator, and its MDN comes back to the API.

Operators A and B on loopback (``pair``). A's software mailbox rx@ (APP) logs in to A's API with
its TLS client certificate (issued by A's CA, registered ``tls-client``) and signs with its own
S/MIME certificate. The API listener is A's real ``ApiServer`` on A's running gateway (its
queue, intake, authenticator and TLS context); workers are driven by the test. The message goes
A -> B over verified mutual TLS, encrypted; B sends the processed MDN back; it lands in rx@'s
INBOX and shows up in ``GET /v1/messages/{id}`` and on the event stream, along with the
recipient's ``delivered`` state.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from e2e_support import A_DOMAIN, PRACTITIONER, Pair, parse

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from directory import admin
from directory.certificates import register_certificate
from directory.db import transaction
from gateway.api.edge import ApiEdge
from gateway.api.server import ApiServer

BACKENDS = ("sqlite", "postgresql")
RX = f"rx@{A_DOMAIN}"


@pytest.fixture
async def rx_api(pair: Pair, tmp_path: Path) -> AsyncIterator[tuple[ApiServer, ssl.SSLContext]]:
    a, b = pair.a, pair.b
    pki = load_dev_pki(a.home / "pki")
    tls_cert, tls_key = issue_certificate(pki, kind="app", email=RX)
    save_certificate_and_key(tls_cert, tls_key, tmp_path / "rx-tls.pem", tmp_path / "rx-tls.key")
    smime_cert, smime_key = issue_certificate(pki, kind="user", email=RX)
    keys_dir = a.home / "keys"
    save_certificate_and_key(smime_cert, smime_key, keys_dir / f"{RX}.pem", keys_dir / f"{RX}.key")
    smime_pem = smime_cert.public_bytes(serialization.Encoding.PEM)
    with transaction(a.sessions) as s:
        admin.add_mailbox(s, RX, type="APP", display_name="Logiciel de prescription")
        register_certificate(s, tls_cert.public_bytes(serialization.Encoding.PEM), address=RX, purpose="tls-client")
        register_certificate(s, smime_pem, address=RX, purpose="smime", key_path=str(keys_dir / f"{RX}.key"))
    with transaction(b.sessions) as s:
        admin.add_mailbox(s, RX, type="ORG")
        register_certificate(s, smime_pem, address=RX, purpose="smime")
    for op in (a, b):
        op.workers.keys.invalidate()  # type: ignore[attr-defined]
    gw: Any = a.gateway
    edge = ApiEdge(a.settings, gw.sessions, gw.intake, gw.store, gw.audit, gw.metrics, gw.authenticator,
                   readers=gw.readers)  # fmt: skip
    server = ApiServer(edge, gw.tls.context)
    server.poll = 0.05
    await server.start("127.0.0.1", 0)
    ctx = ssl.create_default_context(cafile=str(a.home / "pki" / "ca.pem"))
    ctx.load_cert_chain(tmp_path / "rx-tls.pem", tmp_path / "rx-tls.key")
    try:
        yield server, ctx
    finally:
        await server.close()


async def _collect(http: httpx.AsyncClient, done: Any, out: list[tuple[str, dict[str, Any]]],
                   ready: asyncio.Event) -> None:  # fmt: skip
    async with http.stream("GET", "/v1/events") as stream:
        name = ""
        async for line in stream.aiter_lines():
            if line.startswith(": mssgw"):
                ready.set()
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
                if done(out):
                    return


async def test_api_message_reaches_peer_and_its_mdn_comes_back(pair: Pair,
                                                               rx_api: tuple[ApiServer, ssl.SSLContext]) -> None:
    server, ctx = rx_api
    assert server.address is not None
    base = f"https://localhost:{server.address[1]}"
    events: list[tuple[str, dict[str, Any]]] = []
    ready = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, verify=ctx, timeout=30) as http:
        sent = await http.post("/v1/messages", json={
            "from": RX, "to": [PRACTITIONER], "subject": "Ordonnance", "text": "Ordonnance ci-jointe.\n",
            "receipt": True}, headers={"Idempotency-Key": "e2e-1"})
        assert sent.status_code == 202, sent.text
        queue_id = sent.json()["id"]

        def done(out: list[tuple[str, dict[str, Any]]]) -> bool:
            names = {(n, d.get("state")) for n, d in out}
            return ("message.receipt", None) in names and ("message.state", "delivered") in names

        reader = asyncio.create_task(_collect(http, done, events, ready))
        await asyncio.wait_for(ready.wait(), 20)
        await pair.flow()
        await asyncio.wait_for(reader, 30)
        state = (await http.get(f"/v1/messages/{queue_id}")).json()

    # B's practitioner has it, signed by rx@ and verified.
    inbox = pair.b.mailbox(PRACTITIONER)
    assert len(inbox) == 1
    got = parse(inbox[0])
    assert got["Subject"] == "Ordonnance" and "smime=pass" in str(got["Authentication-Results"])
    # The API reports the delivery and the MDN received.
    assert [(r["address"], r["state"], r["protection"]) for r in state["recipients"]] == [
        (PRACTITIONER, "delivered", "smime")]
    received = [r for r in state["receipts"] if r["direction"] == "received"]
    assert len(received) == 1 and received[0]["kind"] == "mdn"
    assert "processed" in received[0]["recipients"][0]["disposition"]
    assert PRACTITIONER in received[0]["recipients"][0]["final_recipient"]
    receipt = next(d for n, d in events if n == "message.receipt")
    assert receipt["id"] == queue_id and receipt["kind"] == "mdn"
    delivered = next(d for n, d in events if n == "message.state" and d["state"] == "delivered")
    assert delivered["id"] == queue_id and delivered["address"] == PRACTITIONER
