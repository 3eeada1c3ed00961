"""Counters of the running gateway and a tiny HTTP endpoint serving them as Prometheus text.

``Metrics`` keeps monotonic counters keyed by name and labels (sessions, logins,
recipient decisions by rule, messages and bytes queued, outages) and gauges read at scrape
time.  The exposition (text format 0.0.4: HELP, TYPE, escaping, number formatting) is
``prometheus_client``'s, fed by a collector over a snapshot of our counters; each ``Metrics``
has its own registry, so several gateways in one process never share series.  The endpoint
is ours on the event loop rather than prometheus_client's threaded server, so that it keeps
the gateway's bounds: ``serve_metrics`` answers ``GET /metrics`` on the address of
``listen.metrics``; any other path is 404, any other method 405; it reads at most one request
head of 8 KiB per connection and closes it after the answer.  Labels never hold message content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

HELP = {
    "mssgw_sessions_total": "SMTP connections accepted, by listener",
    "mssgw_auth_total": "Logins, by result and method",
    "mssgw_mail_total": "MAIL FROM decisions, by listener, decision and rule",
    "mssgw_rcpt_total": "RCPT TO decisions, by listener, decision and rule",
    "mssgw_content_refused_total": "Messages refused at DATA, by rule",
    "mssgw_documents_checked_total": "Messages whose health documents were checked (IHE XDM, CDA, INS, X-MSS), by rule",
    "mssgw_messages_queued_total": "Messages committed to the queue, by origin",
    "mssgw_bytes_queued_total": "Bytes committed to the queue, by origin",
    "mssgw_duplicates_total": "Inbound messages acknowledged but already queued",
    "mssgw_outages_total": "Temporary failures answered 4xx, by kind",
    "mssgw_tls_failures_total": "Failed TLS handshakes, by listener",
    "mssgw_errors_total": "Unexpected errors answered 451, by listener",
    "mssgw_quarantined_messages": "Messages with a recipient held in quarantine now (read from the queue)",
}

log = logging.getLogger("mssgw.metrics")

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], float]] = {}

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """A value read at scrape time (e.g. from the queue database), so it is right after a
        restart and across nodes; ``read`` may block: ``read_gauges`` runs off the event loop."""
        self._gauges[name] = read

    def read_gauges(self) -> dict[str, float]:
        """Every gauge's current value; one that cannot be read (database outage) is left out."""
        values: dict[str, float] = {}
        for name, read in list(self._gauges.items()):
            try:
                values[name] = float(read())
            except Exception as exc:
                log.warning("metrics: gauge %s unreadable (%s)", name, type(exc).__name__)
        return values

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0.0) + value

    def value(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: dict[str, float] | None = None) -> str:
        """The Prometheus text of a snapshot of the counters and of ``gauges`` (values already read)."""
        counters = {name: dict(series) for name, series in list(self._values.items())}
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(counters, dict(gauges or {})))
        return generate_latest(registry).decode("utf-8")


class _Snapshot(Collector):
    """The families of one scrape: counters (named ``*_total``) and gauges, with their labels."""

    def __init__(self, counters: dict[str, dict[Labels, float]], gauges: dict[str, float]) -> None:
        self.counters = counters
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name in sorted(self.counters):
            series = self.counters[name]
            label_names = sorted({k for labels in series for k, _ in labels})
            family = CounterMetricFamily(name.removesuffix("_total"), HELP.get(name, name), labels=label_names)
            for labels, value in sorted(series.items()):
                given = dict(labels)
                family.add_metric([given.get(k, "") for k in label_names], value)
            yield family
        for name, value in sorted(self.gauges.items()):
            yield GaugeMetricFamily(name, HELP.get(name, name), value=value)


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0]
        if method != b"GET":
            status, body, ctype = "405 Method Not Allowed", b"method not allowed\n", "text/plain"
        elif path.split(b"?", 1)[0] != b"/metrics":
            status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
        else:
            gauges = await asyncio.to_thread(metrics.read_gauges)
            status, body = "200 OK", metrics.render(gauges).encode()
            ctype = "text/plain; version=0.0.4; charset=utf-8"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body
        )
        await writer.drain()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await respond(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return  # a client that went away or sent no whole request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(answer, host, port, limit=8192)
