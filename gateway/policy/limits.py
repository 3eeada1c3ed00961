"""Every bound on what a client sends, in one place: the SMTP edge refuses what the workers could not handle.

A message that passed DATA must never fail later for its shape (it would be retried for
days, then bounced): so the workers' MIME limits (``gateway.crypto._mime``) and the edge's
DATA checks (``gateway.policy.content``) import the same constants, and the edge keeps a
margin for the trace and default header fields it adds itself (``Received:``,
``Message-ID:``, ``Date:``, RFC 5321 4.4 and RFC 6409 8).

Standards: RFC 5321 4.5.3.1.4 (command lines of 512 octets), 4.5.3.1.6 (text lines of
1000 octets), 4.5.3.1.8 (at least 100 recipients); RFC 4954 4 and RFC 4616 2 (SASL
responses: each PLAIN field at most 255 octets); RFC 1870 (SIZE).
"""

from __future__ import annotations

# --- the message's shape (workers and edge) -------------------------------------------------

#: A header block (up to the blank line) of this many octets or more is refused by the MIME
#: helpers of the workers.
MAX_HEADER_BYTES = 256 * 1024
#: More header fields than this in one header block are refused by the workers.
MAX_HEADER_FIELDS = 2000
#: More body parts than this in one multipart body are refused by the workers.
MAX_PARTS = 1000
#: The largest message the S/MIME and OpenPGP wrappers take (octets).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: What the edge adds in front of the client's header block (``Received:``, ``Message-ID:``,
#: ``Date:``) stays under these: the edge accepts that much less than the workers.
EDGE_HEADER_RESERVE_BYTES = 8 * 1024
EDGE_HEADER_RESERVE_FIELDS = 16
#: The header block the edge accepts at DATA (octets, fields), below the workers' limits.
EDGE_MAX_HEADER_BYTES = MAX_HEADER_BYTES - EDGE_HEADER_RESERVE_BYTES
EDGE_MAX_HEADER_FIELDS = MAX_HEADER_FIELDS - EDGE_HEADER_RESERVE_FIELDS
#: Multipart and message/* entities nested deeper than this are refused at DATA: Python's
#: ``email`` parser recurses per level (a thousand levels exhaust its stack), and no
#: legitimate message nests this deep.
MAX_MIME_DEPTH = 32
#: The largest message the edge accepts (the configured ``max_message_size`` is clamped to
#: it), leaving room for the added header fields.
EDGE_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES - EDGE_HEADER_RESERVE_BYTES

# --- the SMTP conversation before DATA ---------------------------------------------------

#: RFC 5321 4.5.3.1.4: a command line, CRLF included; MAIL gets room for the SIZE (RFC 1870),
#: BODY (RFC 6152) and SMTPUTF8 (RFC 6531) parameters we advertise.
COMMAND_LINE_BYTES = 512
MAIL_LINE_EXTRA_BYTES = 26 + 10 + 10
#: RFC 3461 §5: where DSN is offered, MAIL may be 100 characters longer (RET, ENVID) and RCPT
#: 500 (NOTIFY, ORCPT of up to 500 characters).
DSN_MAIL_EXTRA_BYTES = 100
DSN_RCPT_EXTRA_BYTES = 500
#: An AUTH command or SASL response line (RFC 4954 4): base64 of the longest PLAIN response
#: (3 x 255 octets, RFC 4616 2) plus the command, CRLF included.
AUTH_LINE_BYTES = 1100
#: An over-long line is read and discarded up to this many octets (answered 500 5.5.6); a
#: longer one closes the connection (421 4.7.0) instead of reading it to its end.
MAX_DISCARDED_LINE_BYTES = 64 * 1024
#: Error replies (5xx) in one session before it is closed with 421 4.7.0 (as Postfix's
#: ``smtpd_hard_error_limit``).
MAX_ERRORS_PER_SESSION = 20
#: Commands in one session before it is closed with 421 4.7.0 (a long-lived peer connection
#: sends a few per message; a thousand messages fit many times over).
MAX_COMMANDS_PER_SESSION = 20_000
#: Seconds a client has from connecting to finish STARTTLS (listeners that require it).
PRE_TLS_SECONDS = 30.0
#: Seconds a client has from connecting to log in (submission: AUTH or a client certificate;
#: inbound: a sender accepted under a verified peer certificate).
PRE_AUTH_SECONDS = 60.0

#: Message content held in memory by all SMTP transactions of one process at once. Past it a
#: DATA in progress stops buffering, reads the rest to its end and answers 452 4.3.1 (try
#: again later): eight authenticated clients sending 40 MiB each in parallel once grew the
#: gateway by 590 MB. A message in hand is copied two or three times on its way to the spool
#: (unstuffing, the trace header, the checks), so the peak is about 3 x this; two messages of
#: the largest size still fit.
MAX_BUFFERED_DATA_BYTES = 128 * 1024 * 1024
