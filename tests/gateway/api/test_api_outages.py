"""Outages answer 503 with the SMTP edge's 4xx codes (retry later), never 2xx and never a permanent refusal;
a taken ``listen.api`` address stops the gateway with a one-line reason."""

from __future__ import annotations

import socket

import pytest
from api_world import ApiCerts, ApiWorld, new_message, prepare_home
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from gateway.app import Gateway, GatewayStartError
from gateway.config import load_settings


async def test_directory_and_queue_outages_are_temporary(api: ApiWorld) -> None:
    server = api.gateway.api
    store = api.gateway.store
    assert server is not None and store is not None
    edge = server.edge
    broken = sessionmaker(create_engine("sqlite:////nonexistent-dir/x.db"))
    async with api.client() as http:
        good = edge.readers
        edge.readers = broken
        try:
            directory = await http.post("/v1/messages", json=new_message())
        finally:
            edge.readers = good
        writes = store._factory
        store._factory = broken  # the queue database fails at commit time
        try:
            queue = await http.post("/v1/messages", json=new_message(), headers={"Idempotency-Key": "after-outage"})
        finally:
            store._factory = writes
        assert store.list(include_done=True) == []
        retried = await http.post("/v1/messages", json=new_message(), headers={"Idempotency-Key": "after-outage"})
    for response, enhanced in ((directory, "4.3.5"), (queue, "4.3.0")):
        problem = response.json()
        assert response.status_code == 503 and response.headers["retry-after"]
        assert problem["enhanced_status"] == enhanced and problem["smtp_code"] in (451, 452)
        assert "Error" not in response.text and "Traceback" not in response.text
    assert retried.status_code == 202  # the failed attempt left no key behind
    assert len(store.list()) == 1


async def test_taken_api_address_stops_the_gateway(sqlite_home, api_certs: ApiCerts) -> None:  # type: ignore[no-untyped-def]
    prepare_home(sqlite_home, api_certs)
    settings = load_settings(sqlite_home)
    host, port = settings.listen("api")  # type: ignore[misc]
    with socket.socket() as taken:
        taken.bind((host, port))
        taken.listen()
        gateway = Gateway(settings, workers=False, imap=False)
        with pytest.raises(GatewayStartError) as caught:
            await gateway.start()
    assert str(caught.value) == f"listen.api: cannot listen on {host}:{port}: address already in use"
