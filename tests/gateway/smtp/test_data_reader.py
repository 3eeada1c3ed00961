"""The chunked DATA reader of ``GatewaySMTP``: same content, limits and replies as aiosmtpd's line reader."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gateway.smtp.server import DATA_BUDGET, GatewaySMTP


async def read(wire: bytes, *, limit: int = 10_000, eof: bool = False, pieces: int = 1) -> tuple[object, bytes]:
    reader = asyncio.StreamReader(limit=1001)
    step = max(1, len(wire) // pieces)
    chunks = [wire[i : i + step] for i in range(0, len(wire), step)]

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        if eof:
            reader.feed_eof()

    fake = SimpleNamespace(_reader=reader, data_size_limit=limit, line_length_limit=1001, _held=0)
    feeder = asyncio.ensure_future(feed())
    try:
        result = await GatewaySMTP._read_data(fake)  # type: ignore[arg-type]
    finally:
        DATA_BUDGET.give_back(fake._held)  # smtp_DATA's part, once the content is handled
    await feeder
    rest = bytes(reader._buffer)
    return result, rest


@pytest.mark.asyncio
@pytest.mark.parametrize("pieces", [1, 3, 50])
async def test_content_unstuffed_and_pipelined_rest_kept(pieces: int) -> None:
    wire = b"Subject: x\r\n\r\n..dot\r\n..\r\nline\r\n.\r\nQUIT\r\n"
    (content, failure), rest = await read(wire, pieces=pieces)
    assert (content, failure) == (b"Subject: x\r\n\r\n.dot\r\n.\r\nline\r\n", None)
    assert rest == b"QUIT\r\n"




@pytest.mark.asyncio
async def test_empty_message_and_eof() -> None:
    assert (await read(b".\r\nRSET\r\n"))[0] == (b"", None)
    assert (await read(b"Subject: x\r\n", eof=True))[0] == (None, None)


@pytest.mark.asyncio
@pytest.mark.parametrize("pieces", [1, 7])
async def test_long_line_and_too_much_data(pieces: int) -> None:
    ok = b"a" * 999 + b"\r\n"
    assert (await read(ok + b".\r\n", pieces=pieces))[0] == (ok, None)
    (_, failure), _ = await read(b"a" * 1000 + b"\r\n.\r\n", pieces=pieces)
    assert failure is not None and failure.startswith("500 Line too long")
    (_, failure), rest = await read(b"x" * 70 + b"\r\n" * 300 + b".\r\nNOOP\r\n", limit=200, pieces=pieces)
    assert failure == "552 Error: Too much mail data" and rest == b"NOOP\r\n"
