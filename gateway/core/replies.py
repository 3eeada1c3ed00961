"""Every SMTP reply the gateway sends, as named constants (RFC 5321 codes, RFC 3463 enhanced codes).

Handlers never write reply strings by hand: they send one of these, or the reply
carried by a policy ``Decision``. A reply's text is for a person: it says what
happened and what to do, never the content of a message or an exception.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        """The same codes with a more specific human reason."""
        return Reply(self.code, self.enhanced, text)

    @property
    def short(self) -> str:
        """``"550 5.7.1"``: what the audit trail and logs record."""
        return f"{self.code} {self.enhanced}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


# 2xx
S250_2_0_0_OK = Reply(250, "2.0.0", "OK")
S250_2_1_0_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
S250_2_1_5_RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
S250_2_6_0_QUEUED = Reply(250, "2.6.0", "Message accepted for delivery")
S235_2_7_0_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
S221_2_0_0_BYE = Reply(221, "2.0.0", "Bye")
S220_2_0_0_TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")

# 4xx: try again later
S421_4_3_2_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
S421_4_4_2_TIMEOUT = Reply(421, "4.4.2", "Idle too long, closing connection")
S451_4_3_0_LOCAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")
S451_4_3_5_POLICY_UNAVAILABLE = Reply(451, "4.3.5", "Directory or policy temporarily unavailable, try again later")
S452_4_3_1_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
S452_4_5_3_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients for one message")
S421_4_7_0_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
S421_4_7_0_TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands in one session, closing connection")
S421_4_7_0_TOO_SLOW = Reply(421, "4.7.0", "Login not done in time, closing connection")
S421_4_7_0_ABUSE = Reply(421, "4.7.0", "Command line far too long, closing connection")
S454_4_7_0_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
S454_4_7_0_AUTH_LOCKED = Reply(454, "4.7.0", "Too many failed logins, try again later")
S454_4_7_0_AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure, try again later")

# 5xx: refused for good
S500_5_5_2_SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognised")
S501_5_5_4_SYNTAX_ARGS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
S501_5_1_3_BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
#: RFC 3461 §4: a malformed ENVID, RET, NOTIFY or ORCPT (the text names which and why).
S501_5_5_4_DSN_SYNTAX = Reply(501, "5.5.4", "Malformed DSN parameter (RFC 3461)")
S503_5_5_1_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
#: RFC 3207 4.2: STARTTLS is offered before TLS only; a second one would nest TLS in TLS.
S503_5_5_1_TLS_ACTIVE = Reply(503, "5.5.1", "TLS is already active")
S530_5_7_0_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
S530_5_7_0_TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
S530_5_7_0_CLIENT_CERT_REQUIRED = Reply(530, "5.7.0", "A TLS client certificate of a trusted operator is required")
#: RFC 5321 4.5.3.1.4 (512 octets; MAIL a little more for its parameters); RFC 4954 uses 500 5.5.6.
S500_5_5_6_LINE_TOO_LONG = Reply(500, "5.5.6", "Command line too long (RFC 5321 4.5.3.1.4)")
S500_5_5_6_AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long (RFC 4954 4)")
S501_5_5_2_BAD_BYTES = Reply(501, "5.5.2", "Argument is not valid UTF-8 text without control characters")
S501_5_5_2_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
S501_5_7_0_AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
S553_5_1_7_BAD_SENDER_BYTES = Reply(553, "5.1.7", "Sender address is not valid UTF-8 without control characters")
S553_5_1_3_BAD_RECIPIENT_BYTES = Reply(553, "5.1.3", "Recipient address is not valid UTF-8 without control characters")
#: RFC 6531 3.4 and RFC 6533 3: a non-ASCII address needs SMTPUTF8 on MAIL.
S553_5_6_7_NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address without the SMTPUTF8 parameter on MAIL")
S503_5_5_1_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
S503_5_5_1_NEED_RCPT = Reply(503, "5.5.1", "Need a valid RCPT command first")
S502_5_5_1_TOO_MANY_BAD = Reply(502, "5.5.1", "Too many unrecognised commands, closing connection")
S554_5_7_0_TLS_FAILED = Reply(554, "5.7.0", "Command refused: TLS negotiation failed")
S550_5_7_1_PEER_CERT_MISMATCH = Reply(
    550, "5.7.1", "Client certificate does not match the sending operator's domain"
)
S535_5_7_8_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
S550_5_1_1_UNKNOWN_RECIPIENT = Reply(550, "5.1.1", "Mailbox unknown in the health directory")
S550_5_1_1_INACTIVE_RECIPIENT = Reply(550, "5.1.1", "Mailbox deactivated in the health directory")
S550_5_7_1_UNTRUSTED_DOMAIN = Reply(550, "5.7.1", "Domain outside the health trust space")
S550_5_7_1_CONSUMER_DOMAIN = Reply(550, "5.7.1", "Consumer mailbox: health data may not be sent there")
S550_5_7_1_BLOCKED_DOMAIN = Reply(550, "5.7.1", "Domain blocked by the operator")
S550_5_7_1_SENDER_NOT_OWNED = Reply(550, "5.7.1", "You may not send as this address")
S550_5_7_1_NOT_LOCAL = Reply(550, "5.7.1", "Relaying denied: recipient is not served by this operator")
S550_5_7_1_PEER_NOT_TRUSTED = Reply(550, "5.7.1", "Sending operator is not in the trust list")
S550_5_7_1_PEER_CERT_REVOKED = Reply(550, "5.7.1", "Client certificate revoked by its authority")
S550_5_7_1_NO_PROTECTION = Reply(550, "5.7.1", "No way to protect mail for this recipient")
S550_5_7_1_FROM_MISMATCH = Reply(550, "5.7.1", "From: header does not match an address you may send as")
S550_5_7_1_SENDER_HEADER_MISMATCH = Reply(
    550, "5.7.1", "Sender: or Resent- header does not match an address you may send as"
)
S552_5_3_4_TOO_BIG = Reply(552, "5.3.4", "Message too big for system")
S550_5_6_0_LINE_TOO_LONG = Reply(550, "5.6.0", "Message has a line longer than 998 octets (RFC 5322 2.1.1)")
S550_5_6_0_BAD_CONTENT = Reply(550, "5.6.0", "Malformed message content")
S554_5_6_0_BAD_CONTENT = Reply(554, "5.6.0", "Malformed message content")
S553_5_1_7_BAD_SENDER = Reply(553, "5.1.7", "Bad sender address syntax")
#: Health documents (IHE XDM packages, MSSanté Référentiel #2 ECO.2.4): RFC 3463 5.6.0, media error.
S554_5_6_0_XDM_INVALID = Reply(554, "5.6.0", "IHE XDM package refused")
S554_5_6_0_INS_MALFORMED = Reply(554, "5.6.0", "Patient INS in the IHE XDM package is malformed")
S554_5_6_0_XMSS_MISMATCH = Reply(554, "5.6.0", "X-MSS header fields contradict the IHE XDM package")
S554_5_6_0_PATIENT_INS = Reply(554, "5.6.0", "A message to a patient carries that patient's INS in an IHE XDM package")
#: The national patient messaging (<INS>@patient.mssante.fr, MSSante Ref. #2 3.4.2.3).
S550_5_1_1_NOT_A_PATIENT = Reply(550, "5.1.1", "Not a patient mailbox: the address is an INS with its key")
S550_5_7_1_PATIENT_SENDER = Reply(550, "5.7.1", "Only practitioners' and organisations' mailboxes may write to a patient")
S554_5_6_0_XMSS_MISSING = Reply(
    554, "5.6.0", "X-MSS-CODECDA and X-MSS-INS are required with an IHE XDM package (MSSante Ref. #2 ECO.2.4)"
)
S555_5_5_4_BAD_PARAMS = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognised")
