"""aiosmtpd's SMTP server with STARTTLS done by the event loop (``loop.start_tls``).

aiosmtpd wires asyncio's pure-Python ``SSLProtocol`` under the connection by hand, so every TLS
record of a STARTTLS session costs Python work, even on uvloop.  ``loop.start_tls`` gives the
loop's own TLS transport (C on uvloop); afterwards the session is reset as aiosmtpd does
(RFC 3207 4.2: nothing learnt before TLS is kept) and plaintext pipelined after the STARTTLS
command is dropped (RFC 3207 5).  A STARTTLS under TLS is refused (503 5.5.1): aiosmtpd no longer
offers it then, but would start TLS inside TLS.  Everything else is aiosmtpd's.
"""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

__all__ = ["LoopTlsSMTP"]


class LoopTlsSMTP(SMTP):
    """``SMTP`` whose STARTTLS uses ``loop.start_tls``."""

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if self._tls_protocol is not None:  # after STARTTLS, or on an implicit-TLS listener
            await self.push("503 TLS already active")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        plain = self.transport
        assert plain is not None
        # Plaintext pipelined after STARTTLS is dropped now: what arrives once the handshake is
        # done is already the client's first command under TLS.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        try:
            secure = await self.loop.start_tls(plain, self, self.tls_context, server_side=True)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if secure is None:  # the connection closed during the handshake
            raise TLSSetupException()
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session = self._create_session()
        self._reset_timeout()
        self._reader._transport = secure  # type: ignore[attr-defined]
        self._writer._transport = secure  # type: ignore[attr-defined]
        self.transport = secure
        self._over_ssl = True  # asyncio.StreamReaderProtocol: no half-close on TLS
        self._tls_protocol = secure  # type: ignore[assignment]  # aiosmtpd tests it for "TLS is on"
        self.session.peer = secure.get_extra_info("peername")
        self.session.ssl = {"ssl_object": secure.get_extra_info("ssl_object"),
                            "peercert": secure.get_extra_info("peercert"), "sslcontext": self.tls_context}  # fmt: skip
        hook = self._handle_hooks.get("STARTTLS")
        self._tls_handshake_okay = True if hook is None else hook(self, self.session, self.envelope)
