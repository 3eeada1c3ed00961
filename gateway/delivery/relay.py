"""Relay to a peer operator: SMTP with STARTTLS required, verified server, our client certificate.

The job: hand one protected message to the peer's inbound server and say, per recipient,
whether it was accepted, refused for now or refused for good.  Nothing is ever sent in clear
or over an unauthenticated channel:

- STARTTLS (RFC 3207) is required; a peer that does not offer it gets nothing (4.7.5 deferral).
- The server certificate must chain to our trust anchors (directory ``anchor`` rows, the
  development CA, ``tls.client_ca``) and must not be revoked (CRLs, RFC 5280).
- When the trust list has the peer's ``operator_dn`` (MSSanté whitelist ``DNCertificatOperateur``),
  the certificate's subject must equal it; RFC 4514 strings are compared as sets of
  (attribute, value) so the order of the RDNs and the case of the values do not matter.  Without
  an ``operator_dn`` the host name is checked instead (RFC 6125).
- We present our operator certificate (``tls.operator_cert``/``tls.operator_key``): mutual TLS.

A route is either a fixed relay (``host:port``) or the domain's MX records (``Route.use_mx``,
RFC 5321 §5.1, resolved by ``gateway.delivery.mx``): the hosts are tried in preference order on
``relay.mx_port``, each of their addresses in turn.  A connection or TLS failure moves on to the
next address or host; an SMTP reply from a host we reached (success, 4xx or 5xx) is the answer.
Without an ``operator_dn`` an MX host's certificate must carry the MX host name (RFC 7672 §3.2.2
style: the name from the MX record, never one taken from the connection).  DNS outcomes come back
as attempts too: null MX (RFC 7505) 556 5.1.10 and NXDOMAIN 550 5.1.2 are permanent, a DNS
timeout or SERVFAIL is 451 4.4.3.

Connections are reused: a small pool per server (``POOL_SIZE``; each MX host has its own), each
connection used by one transaction at a time, reset with RSET (RFC 5321 §4.1.1.5) before its next
use, closed after ``IDLE_SECONDS`` unused, after any network or protocol error, after a 421, and
by ``close``.
The peer's certificate is checked when the connection is made.

Delivery status notifications (RFC 3461 §6.2): when the peer advertises ``DSN``, what the sender
asked (``ENVID``, ``RET`` on MAIL; ``NOTIFY``, ``ORCPT`` on each RCPT, xtext-encoded, §4) is passed
on, and the peer answers for what happens next: ``Attempt.dsn_passed`` tells the pipeline not to
send a "relayed" notice of its own.  A peer without ``DSN`` gets none of them, and a recipient
that asked NOTIFY=SUCCESS gets our "relayed" DSN instead (§6.2.2.2).

Replies follow RFC 5321 §4.2 and RFC 3463: 4xx (and connection, TLS and timeout problems) are
temporary, 5xx permanent.  ``Attempt`` carries the reply text for the queue and the DSN.

Errors: ``send`` never raises for a network or protocol problem; it returns one ``Attempt``
per recipient.  ``RelayConfigError`` (from building the TLS context) is raised when our own
certificate or anchors are unusable, which the worker turns into a deferral.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiosmtplib
from cryptography import x509

from gateway.config import Settings
from gateway.core.errors import ConfigurationError
from gateway.crypto.trust import TrustStore
from gateway.delivery.mx import MxFailure, MxResolver

__all__ = ["Attempt", "DsnRequest", "Relay", "RelayConfigError", "Route", "dn_equal", "xtext"]

CONNECT_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0  # RFC 5321 §4.5.3.2 suggests minutes; a peer doing crypto may be slow
# DATA, the content and the reply to its final ".": RFC 5321 §4.5.3.2.6 asks 10 minutes, the peer
# may be storing and checking the message meanwhile.  Given up sooner, a message the peer then
# accepts is sent again, and a peer without duplicate detection delivers it twice.
DATA_TIMEOUT = 600.0
RSET_TIMEOUT = 10.0
POOL_SIZE = 16  # connections (and so concurrent transactions) per route
IDLE_SECONDS = 30.0  # an unused pooled connection is closed after this

_Key = tuple[str, int, str | None]

log = logging.getLogger("mssgw.delivery")


class RelayConfigError(ConfigurationError):
    """Our side of TLS cannot be set up (certificate, key or anchors unusable)."""


@dataclass(frozen=True)
class Route:
    """Where mail for a peer domain goes: a fixed ``host:port``, or (``use_mx``) the domain's MX
    hosts on ``relay.mx_port``, ``host`` and ``port`` then being unused."""

    domain: str
    host: str
    port: int
    operator_dn: str | None = None
    use_mx: bool = False


@dataclass(frozen=True)
class _Hop:
    """One server to try: the name its certificate is checked against, and where to connect."""

    domain: str
    name: str
    address: str
    port: int
    operator_dn: str | None

    @property
    def remote(self) -> str:
        return f"{self.name}:{self.port}"

    @property
    def label(self) -> str:
        return self.remote if self.name == self.address else f"{self.name}[{self.address}]:{self.port}"

    @property
    def key(self) -> _Key:
        return (self.name, self.port, self.operator_dn)


@dataclass(frozen=True)
class _Unreached:
    """No SMTP transaction happened with a server: why, as a temporary reply."""

    code: int
    enhanced: str
    why: str


@dataclass(frozen=True)
class Attempt:
    """The outcome for one recipient."""

    address: str
    code: int
    enhanced: str
    text: str
    remote: str = ""
    #: The peer took the sender's DSN request (it advertised DSN): it, not we, reports success.
    dsn_passed: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".strip()


@dataclass(frozen=True)
class DsnRequest:
    """What the sender asked of delivery status notifications (RFC 3461 §4), decoded as queued."""

    envid: str | None = None
    ret: str | None = None  # FULL or HDRS
    #: address -> (NOTIFY value or None, ORCPT as "addr-type;address" or None)
    recipients: Mapping[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def mail_options(self) -> list[str]:
        options = [f"RET={self.ret}"] if self.ret else []
        return options + ([f"ENVID={xtext(self.envid)}"] if self.envid else [])

    def rcpt_options(self, address: str) -> list[str]:
        notify, orcpt = self.recipients.get(address, (None, None))
        options = [f"NOTIFY={notify}"] if notify else []
        if orcpt:
            addr_type, _, original = orcpt.partition(";")
            options.append(f"ORCPT={addr_type};{xtext(original)}")
        return options


def xtext(text: str) -> str:
    """RFC 3461 §4 xtext: printable ASCII but "+" and "=" as is, every other octet as "+XX"."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
                   for c in text)  # fmt: skip


def _dn_set(dn: str) -> frozenset[tuple[str, str]]:
    text = dn.strip()
    if text.startswith("/"):  # OpenSSL's one-line form: /C=FR/O=.../CN=...
        text = ",".join(p for p in re.split(r"(?<!\\)/", text) if p)
    # Whitelists write "CN=x, O=y": spaces after the separators are not part of RFC 4514.
    text = re.sub(r"(?<!\\)([,+])\s+", r"\1", text)
    text = re.sub(r"\s*=\s*", "=", text)
    name = x509.Name.from_rfc4514_string(text)
    return frozenset(
        (attr.oid.dotted_string, " ".join(str(attr.value).split()).casefold()) for attr in name
    )


def dn_equal(a: str, b: str) -> bool:
    """RFC 4514 distinguished names equal as sets of (type, value), case- and order-insensitive."""
    try:
        return _dn_set(a) == _dn_set(b)
    except ValueError:
        return False


def _split_reply(message: str, code: int) -> tuple[str, str]:
    first = message.strip().split(" ", 1)
    if first and len(first[0].split(".")) == 3 and first[0][0] in "245":
        return first[0], first[1] if len(first) > 1 else ""
    default = "2.0.0" if code < 400 else "4.0.0" if code < 500 else "5.0.0"
    return default, message.strip()


class Relay:
    """Sends protected messages to peer operators over verified mutual TLS."""

    def __init__(self, settings: Settings, *, anchors_pem: Sequence[bytes] = (),
                 trust: TrustStore | None = None, timeout: float = COMMAND_TIMEOUT, pool_size: int = POOL_SIZE,
                 idle_seconds: float = IDLE_SECONDS, data_timeout: float = DATA_TIMEOUT) -> None:  # fmt: skip
        self.settings = settings
        self.anchors_pem = b"\n".join(p.strip() for p in anchors_pem).decode("ascii")
        self.trust = trust
        self.timeout = timeout
        self.data_timeout = max(timeout, data_timeout)
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self.pool_size = pool_size
        self.idle_seconds = idle_seconds
        self._idle: dict[_Key, list[tuple[aiosmtplib.SMTP, float]]] = {}
        self._sems: dict[_Key, asyncio.Semaphore] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._mx: MxResolver | None = None

    def reload(self, anchors_pem: Sequence[bytes], trust: TrustStore | None) -> None:
        """New trust anchors (an admin ran ``mssgw peers add``): new connections use them.

        Pooled connections were verified with the old anchors and are closed when next taken.
        """
        self.anchors_pem = b"\n".join(p.strip() for p in anchors_pem).decode("ascii")
        self.trust = trust
        self._contexts = {}
        stale, self._idle = self._idle, {}
        for clients in stale.values():
            for client, _since in clients:
                client.close()

    def _context(self, check_hostname: bool) -> ssl.SSLContext:
        ctx = self._contexts.get(check_hostname)
        if ctx is None:
            from gateway.core.tls import TlsConfigError, client_context

            try:
                ctx = client_context(self.settings)
                if self.anchors_pem:
                    ctx.load_verify_locations(cadata=self.anchors_pem)
            except (TlsConfigError, ssl.SSLError, ValueError) as exc:
                raise RelayConfigError(str(exc)) from None
            ctx.check_hostname = check_hostname
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._contexts[check_hostname] = ctx
        return ctx

    # --- connections ---------------------------------------------------------------------------

    def _slots(self, key: _Key) -> asyncio.Semaphore:
        sem = self._sems.get(key)
        if sem is None:
            sem = self._sems[key] = asyncio.Semaphore(self.pool_size)
        return sem

    async def _open(self, hop: _Hop) -> tuple[aiosmtplib.SMTP | None, str | None, tuple[int, str]]:
        """A connected, verified, post-TLS-EHLO client, or (None, why, (code, enhanced))."""
        ctx = self._context(check_hostname=hop.operator_dn is None)
        remote = hop.label
        client = aiosmtplib.SMTP(
            hostname=hop.address, port=hop.port, local_hostname=self.settings.hostname,
            start_tls=False, timeout=self.timeout,
        )  # fmt: skip
        try:
            await asyncio.wait_for(client.connect(), CONNECT_TIMEOUT)
        except (OSError, aiosmtplib.SMTPException, TimeoutError) as exc:
            client.close()
            return None, f"cannot connect to {remote}: {_reason(exc)}", (451, "4.4.1")
        try:
            await client.ehlo()
            if not client.supports_extension("starttls"):
                await _quit(client)
                return None, f"{remote} does not offer STARTTLS; nothing sent in clear", (454, "4.7.5")
            await client.starttls(tls_context=ctx, server_hostname=hop.name)
        except ssl.SSLCertVerificationError as exc:
            await _quit(client)
            return None, f"certificate of {remote} not trusted: {exc.verify_message}", (454, "4.7.5")
        except (ssl.SSLError, OSError, aiosmtplib.SMTPException, TimeoutError) as exc:
            await _quit(client)
            return None, f"TLS with {remote} failed: {_reason(exc)}", (454, "4.7.5")
        problem = self._check_peer(client, hop)
        if problem:
            await _quit(client)
            return None, problem, (454, "4.7.5")
        try:
            await client.ehlo()  # RFC 3207 §4.2: forget what was learnt before TLS
        except (OSError, aiosmtplib.SMTPException, TimeoutError) as exc:
            await _quit(client)
            return None, f"EHLO after STARTTLS with {remote} failed: {_reason(exc)}", (451, "4.4.2")
        return client, None, (250, "2.0.0")

    async def _reuse(self, key: _Key) -> aiosmtplib.SMTP | None:
        """The most recently used idle connection of the route that still answers RSET."""
        idle = self._idle.get(key)
        while idle:
            client, since = idle.pop()
            if time.monotonic() - since > self.idle_seconds or not client.is_connected:
                await _quit(client)
                continue
            try:
                await asyncio.wait_for(client.rset(), RSET_TIMEOUT)
            except (OSError, aiosmtplib.SMTPException, TimeoutError):
                client.close()
                continue
            return client
        return None

    def _give_back(self, key: _Key, client: aiosmtplib.SMTP) -> None:
        self._idle.setdefault(key, []).append((client, time.monotonic()))
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="relay-idle-reaper")

    async def _reap(self) -> None:
        """Close connections idle longer than ``idle_seconds``; stops when none are left."""
        while any(self._idle.values()):
            await asyncio.sleep(max(0.05, self.idle_seconds / 3))
            cutoff = time.monotonic() - self.idle_seconds
            for key, idle in list(self._idle.items()):
                stale = [c for c, since in idle if since < cutoff]
                idle[:] = [(c, since) for c, since in idle if since >= cutoff]
                for client in stale:
                    await _quit(client)
                if not idle:
                    self._idle.pop(key, None)

    async def close(self) -> None:
        """QUIT every idle connection (the worker stops)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
            self._reaper = None
        idle, self._idle = self._idle, {}
        await asyncio.gather(*(_quit(c) for conns in idle.values() for c, _ in conns), return_exceptions=True)

    # --- sending ---------------------------------------------------------------------------------

    async def send(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt]:  # fmt: skip
        """Deliver ``data`` to ``recipients`` via ``route``; one ``Attempt`` per recipient.

        Connections are pooled per server (at most ``pool_size``, each used by one transaction at
        a time): an idle one is reset with RSET and reused, a new one is verified as above.  A
        connection that had a network or protocol problem is closed, never given back.  For an
        MX route the hosts are tried in order until one is reached (see the module docstring)."""
        if route.use_mx:
            return await self._send_mx(route, sender, recipients, data, dsn)
        hop = _Hop(route.domain, route.host, route.host, route.port, route.operator_dn)
        result = await self._try(hop, sender, recipients, data, dsn)
        if isinstance(result, _Unreached):
            return [Attempt(r, result.code, result.enhanced, result.why, hop.remote) for r in recipients]
        return result

    def _mx_resolver(self) -> MxResolver:
        if self._mx is None:
            self._mx = MxResolver(self.settings)
        return self._mx

    async def _send_mx(self, route: Route, sender: str, recipients: Sequence[str], data: bytes,
                       dsn: DsnRequest | None) -> list[Attempt]:  # fmt: skip
        found = await self._mx_resolver().hosts(route.domain)
        if isinstance(found, MxFailure):
            log.info("no MX route to %s: %s %s %s", route.domain, found.code, found.enhanced, found.text)
            return [Attempt(r, found.code, found.enhanced, found.text) for r in recipients]
        port = self.settings.relay.mx_port
        failures: list[tuple[_Hop, _Unreached]] = []
        for host in found:
            for address in host.addresses:
                hop = _Hop(route.domain, host.name, address, port, route.operator_dn)
                result = await self._try(hop, sender, recipients, data, dsn)
                if not isinstance(result, _Unreached):
                    return result
                log.info("MX %s of %s not usable, trying the next one: %s", hop.label, route.domain, result.why)
                failures.append((hop, result))
        if not failures:
            return [Attempt(r, 451, "4.4.4", f"no MX host of {route.domain} to try") for r in recipients]
        # A TLS or certificate problem says more than a refused connection: report it first.
        hop, worst = next(((h, f) for h, f in failures if f.enhanced == "4.7.5"), failures[-1])
        text = "; ".join(f.why for _, f in failures)
        if len(failures) > 1:
            text = f"no MX host of {route.domain} could be used: {text}"
        return [Attempt(r, worst.code, worst.enhanced, text[:900], hop.remote) for r in recipients]

    async def _try(self, hop: _Hop, sender: str, recipients: Sequence[str], data: bytes,
                   dsn: DsnRequest | None = None) -> list[Attempt] | _Unreached:  # fmt: skip
        """The attempts of one transaction with ``hop``, or why it could not be reached."""
        key = hop.key
        async with self._slots(key):
            client = await self._reuse(key) if self.pool_size > 0 and self.idle_seconds > 0 else None
            if client is None:
                client, why, (code, enhanced) = await self._open(hop)
                if client is None:
                    return _Unreached(code, enhanced, why or "")
            attempts, healthy = await self._transaction(client, sender, recipients, data, hop.remote, dsn)
            if healthy and client.is_connected and self.idle_seconds > 0:
                self._give_back(key, client)
            else:
                await _quit(client)
            return attempts

    def _check_peer(self, client: aiosmtplib.SMTP, hop: _Hop) -> str | None:
        ssl_object = client.get_transport_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return f"{hop.label} presented no certificate"
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        if hop.operator_dn and not dn_equal(subject, hop.operator_dn):
            return f"certificate subject {subject!r} of {hop.domain}'s server does not match the operator DN {hop.operator_dn!r}"
        if self.trust is not None:
            result = self.trust.validate(cert, purpose="serverAuth")
            if result.revoked:
                return f"certificate of {hop.domain}'s server is revoked ({result.detail})"
        return None

    async def _transaction(self, client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str],
                           data: bytes, remote: str, dsn: DsnRequest | None = None) -> tuple[list[Attempt], bool]:  # fmt: skip
        """Per-recipient attempts, and whether the connection is fit for another transaction."""
        options = ["BODY=8BITMIME"] if client.supports_extension("8bitmime") and not data.isascii() else []
        passed = dsn is not None and client.supports_extension("dsn")
        if dsn is not None and passed:
            options += dsn.mail_options()
        try:
            await client.mail(sender, options=options)
        except aiosmtplib.SMTPResponseException as exc:
            enh, text = _split_reply(exc.message, exc.code)
            healthy = exc.code != 421
            return [Attempt(r, exc.code, enh, f"MAIL FROM refused: {text}", remote) for r in recipients], healthy
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return [Attempt(r, 451, "4.4.2", f"connection lost: {_reason(exc)}", remote) for r in recipients], False
        healthy = True
        results: dict[str, Attempt] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                await client.rcpt(rcpt, options=dsn.rcpt_options(rcpt) if dsn is not None and passed else None)
                accepted.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                enh, text = _split_reply(exc.message, exc.code)
                results[rcpt] = Attempt(rcpt, exc.code, enh, text, remote)
                healthy = healthy and exc.code != 421
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                results[rcpt] = Attempt(rcpt, 451, "4.4.2", f"connection lost: {_reason(exc)}", remote)
                healthy = False
        if accepted:
            try:
                response = await client.data(data, timeout=self.data_timeout)
                enh, text = _split_reply(response.message, response.code)
                for rcpt in accepted:
                    results[rcpt] = Attempt(rcpt, response.code, enh, text, remote, dsn_passed=passed)
            except aiosmtplib.SMTPResponseException as exc:
                enh, text = _split_reply(exc.message, exc.code)
                for rcpt in accepted:
                    results[rcpt] = Attempt(rcpt, exc.code, enh, text, remote)
                healthy = exc.code != 421
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                for rcpt in accepted:
                    results[rcpt] = Attempt(rcpt, 451, "4.4.2", f"connection lost during DATA: {_reason(exc)}", remote)
                healthy = False
        return [results[r] for r in recipients], healthy


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        client.close()
        return
    try:
        await asyncio.wait_for(client.quit(), 5)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:300]
