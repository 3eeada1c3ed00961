"""Seeded session scripts for the gateway fuzzer: valid SMTP and IMAP transcripts, then mutated.

Why scripts and not random bytes: random bytes rarely get past the greeting, so each
session starts from a transcript a real client would send (EHLO, STARTTLS, AUTH, MAIL,
RCPT, DATA with nested MIME and many headers; IMAP LOGIN, SELECT, FETCH, SEARCH,
APPEND with literals, IDLE ...) and then applies a few mutations: byte flips, inserted
control bytes and invalid UTF-8, truncation, huge (bounded) lines and literals, line
endings swapped, steps merged (pipelining), reordered or duplicated, and early close.

Determinism: session ``i`` of seed ``s`` is built from ``random.Random(f"{s}:{i}")``
alone, so a run replays exactly whatever the concurrency, and one session can be
replayed by its index. ``CANARY`` is put in every piece of client text that is not an
envelope address (HELO name, subject, body, passwords, IMAP arguments): the gateway's
log must never contain it.

``avoid_known`` skips sessions that hit findings already being fixed (see
``KNOWN_ISSUES``), so a long run can look for new ones.
"""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass, field

CANARY = "FZCANARY7q"
CRLF = b"\r\n"

#: Bounds: the fuzzer attacks limits, it does not exhaust the test machine.
MAX_HUGE_LINE = 300_000
MAX_LITERAL_SENT = 300_000
MAX_MIME_DEPTH = 80
MAX_HEADERS = 3_000

SMTP_KINDS = ("submission", "submission-auth", "submissions-auth", "inbound", "inbound-tls")
SMTP_WEIGHTS = (3, 6, 2, 1, 3)
IMAP_KINDS = ("imap-pre", "imap-starttls", "imap-auth", "imaps-auth")
IMAP_WEIGHTS = (2, 1, 4, 3)

#: Findings reported and being fixed elsewhere; ``avoid_known`` skips sessions that match.
KNOWN_ISSUES = {
    "imap-mutf7": "IMAP mailbox name with an invalid modified UTF-7 '&' sequence freezes the IMAP loop",
    "imap-create-odd": "IMAP CREATE/RENAME with odd names answers a traceback",
    "imap-prelogin-literal": "huge IMAP literal before login is buffered",
    "smtp-8bit-mail-from": "non-UTF-8 bytes in MAIL FROM wedge the audit writer",
    "smtp-body-after-refused-data": "body lines after a refused DATA reach the log",
}


@dataclass(frozen=True)
class Credentials:
    """Who the fuzzer is: a submission account, a peer sender, local recipients, an IMAP account."""

    user: str
    password: str
    local_rcpts: tuple[str, ...]
    peer_sender: str
    imap_user: str
    imap_password: str

    @property
    def domain(self) -> str:
        return self.user.rsplit("@", 1)[1]


@dataclass
class Step:
    """Bytes to write and what to wait for.

    ``action``: ``send`` (write, then read ``expect`` replies), ``greeting``, ``starttls``
    (upgrade if the reply allows), ``data`` (DATA command), ``body`` (message after a 354:
    sent only if DATA got 354, unless ``force``), ``close`` (write then drop the connection).
    """

    data: bytes
    action: str = "send"
    expect: int = 1
    force: bool = False


@dataclass
class Script:
    index: int
    protocol: str  # smtp | imap
    kind: str
    steps: list[Step]
    mutations: list[str] = field(default_factory=list)
    known: str | None = None  # a KNOWN_ISSUES key this session hits

    @property
    def implicit_tls(self) -> bool:
        return self.kind in ("submissions-auth", "imaps-auth")

    @property
    def client_cert(self) -> bool:
        return self.kind == "inbound-tls"

    def wire(self) -> list[bytes]:
        return [s.data for s in self.steps]


# --- mutations --------------------------------------------------------------------------------------

ODD_BYTES = [b"\x00", b"\r", b"\n", b"\x1b", b"\x7f", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
             b"\xe2\x80\xae", b"\r\n.\r\n", b"\n.\n", b"%s%n", b"\"", b"{", b"(", b"\\", b"\t", b" " * 50]


def _flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _insert(rng: random.Random, data: bytes) -> bytes:
    i = rng.randint(0, len(data))
    return data[:i] + rng.choice(ODD_BYTES) + data[i:]


def _delete(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16):]


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randint(0, len(data))]


def _huge(rng: random.Random, data: bytes) -> bytes:
    size = rng.choice([999, 1000, 1001, 4096, 65_537, rng.randint(1, MAX_HUGE_LINE)])
    i = rng.randint(0, max(0, len(data) - 2))
    return data[:i] + bytes([rng.choice(b"Ax0.\xe9 ")]) * size + data[i:]


def _line_ends(rng: random.Random, data: bytes) -> bytes:
    return data.replace(CRLF, rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"]))


def _case(rng: random.Random, data: bytes) -> bytes:
    return data.swapcase() if rng.random() < 0.5 else data.lower()


def _random_bytes(rng: random.Random, data: bytes) -> bytes:
    return rng.randbytes(rng.randint(1, 200)) + CRLF


BYTE_MUTATIONS = {"flip": _flip, "insert": _insert, "delete": _delete, "truncate": _truncate, "huge": _huge,
                  "line-ends": _line_ends, "case": _case, "random": _random_bytes}


def mutate(rng: random.Random, script: Script) -> None:
    """Apply 0-4 mutations in place; names are recorded on the script."""
    count = rng.choice([0, 0, 1, 1, 1, 2, 2, 3, 4])
    for _ in range(count):
        choice = rng.choice([*BYTE_MUTATIONS, "merge", "swap", "duplicate", "early-close", "force-body"])
        steps = script.steps
        candidates = [i for i, s in enumerate(steps) if s.action != "greeting"]
        if not candidates:
            return
        i = rng.choice(candidates)
        if choice in BYTE_MUTATIONS:
            steps[i].data = BYTE_MUTATIONS[choice](rng, steps[i].data)
        elif choice == "merge" and i + 1 < len(steps):  # pipelining: two steps written at once
            nxt = steps.pop(i + 1)
            steps[i].data += nxt.data
            steps[i].expect += nxt.expect
            steps[i].action = "send"
        elif choice == "swap" and i + 1 < len(steps):  # odd ordering
            steps[i], steps[i + 1] = steps[i + 1], steps[i]
        elif choice == "duplicate":
            steps.insert(i, Step(steps[i].data, steps[i].action, steps[i].expect, steps[i].force))
        elif choice == "early-close":
            cut = steps[i]
            del steps[i + 1:]
            cut.data = cut.data[: rng.randint(0, len(cut.data))]
            cut.action = "close"
        elif choice == "force-body":
            for s in steps:
                if s.action == "body":
                    s.force = True
        else:
            continue
        script.mutations.append(choice)


# --- SMTP ----------------------------------------------------------------------------------------

def _dot_stuff(body: bytes) -> bytes:
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def _mime(rng: random.Random, depth: int) -> bytes:
    if depth <= 0 or rng.random() < 0.2:
        kind = rng.choice([b"text/plain; charset=utf-8", b"application/pdf", b"text/html", b"message/rfc822",
                           b"application/octet-stream", b"text/plain; charset=\"\xff\""])
        payload = f"Resultats {CANARY} glycemie 5.2\r\n".encode() * rng.randint(1, 4)
        if rng.random() < 0.3:
            payload = base64.encodebytes(payload * 3).replace(b"\n", CRLF)
            kind += b"\r\nContent-Transfer-Encoding: base64"
        return b"Content-Type: " + kind + CRLF + CRLF + payload
    boundary = f"b{depth}x{rng.randrange(10**6)}".encode()
    # One deep branch and shallow siblings: depth without an exponential tree.
    parts = [_mime(rng, depth - 1), *(_mime(rng, 0) for _ in range(rng.randint(0, 2)))]
    rng.shuffle(parts)
    out = b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\npreamble\r\n"
    for part in parts:
        out += b"--" + boundary + CRLF + part + CRLF
    if rng.random() < 0.9:  # sometimes unterminated
        out += b"--" + boundary + b"--\r\n"
    return out


def message(rng: random.Random, sender: str, rcpt: str) -> bytes:
    """A message with the header From: the envelope sender (the submission rule), varied in shape."""
    head = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: Compte rendu {CANARY}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMessage-ID: <{rng.randrange(10**12)}.fz@fuzz.test>\r\n"
            "MIME-Version: 1.0\r\n").encode()
    shape = rng.choice(["plain", "plain", "nested", "headers", "long", "smuggle", "binary"])
    if shape == "nested":
        return head + _mime(rng, rng.randint(1, MAX_MIME_DEPTH))
    if shape == "headers":
        extra = b"".join(f"X-Fz-{n}: {CANARY} {n}\r\n".encode() for n in range(rng.choice([50, 200, 1000, MAX_HEADERS])))
        return head + extra + b"Content-Type: text/plain\r\n\r\nBonjour " + CANARY.encode() + CRLF
    if shape == "long":
        folded = b"X-Long: " + b"\r\n ".join([b"w" * 70] * rng.randint(10, 2000)) + CRLF
        return head + folded + b"\r\n" + (b"y" * rng.randint(900, 1100) + CRLF) * rng.randint(1, 50)
    if shape == "smuggle":  # SMTP smuggling attempts inside the body
        tail = rng.choice([b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n\x00.\r\n"])
        return head + b"\r\nBonjour\r\n" + tail + b"MAIL FROM:<evil@b.mssante.test>\r\nRCPT TO:<x@y>\r\nDATA\r\n"
    if shape == "binary":
        return head + b"Content-Type: application/octet-stream\r\n\r\n" + rng.randbytes(2000)
    return head + b"Content-Type: text/plain; charset=utf-8\r\n\r\n.Bonjour " + CANARY.encode() + b"\r\n..\r\n.\r\n"


def _mail_params(rng: random.Random) -> bytes:
    return rng.choice([b"", b"", b" SIZE=1000", b" BODY=8BITMIME", b" SIZE=999999999999", b" SMTPUTF8",
                       b" RET=HDRS ENVID=x", b" AUTH=<>", b" FOO=BAR", b" SIZE=-1"])


def _smtp_noise(rng: random.Random, creds: Credentials) -> bytes:
    return rng.choice([
        b"NOOP", b"RSET", b"HELP", b"VRFY " + creds.local_rcpts[0].encode(), b"EXPN staff", b"TURN",
        b"BDAT 10 LAST", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"STARTTLS", b"EHLO", b"HELO",
        b"MAIL", b"RCPT", b"DATA", b"", b" ", b"QUIT extra", b"XCLIENT ADDR=1.2.3.4", b"ETRN a",
        b"MAIL FROM:<" + b"a" * 300 + b"@x>", b"RCPT TO:<@route,@x:user@" + creds.domain.encode() + b">",
        b"MAIL FROM:<\"quoted\\\"\"@x>", b"RCPT TO:<" + CANARY.encode() + b">", b"AUTH PLAIN =",
        b"AUTH PLAIN " + base64.b64encode(b"\x00\x00"),
    ]) + CRLF


def _rcpts(rng: random.Random, creds: Credentials) -> list[str]:
    pool = [*creds.local_rcpts, f"nobody@{creds.domain}", "doc@b.mssante.test", "x@unknown.example",
            f"old@{creds.domain}", "", "postmaster", f"{'l' * 70}@{creds.domain}"]
    return [rng.choice(pool) for _ in range(rng.randint(1, 4))]


def smtp_script(rng: random.Random, index: int, creds: Credentials) -> Script:
    kind = rng.choices(SMTP_KINDS, SMTP_WEIGHTS)[0]
    steps = [Step(b"", "greeting")]
    helo = rng.choice([b"EHLO fuzz.example", b"EHLO fuzz.example", b"HELO fuzz.example",
                       b"EHLO " + CANARY.encode(), b"EHLO [127.0.0.1]"])
    steps.append(Step(helo + CRLF))
    if kind in ("submission", "submission-auth", "inbound-tls") and rng.random() < 0.95:
        steps.append(Step(b"STARTTLS\r\n", "starttls"))
        steps.append(Step(b"EHLO fuzz.example\r\n"))
    inbound = kind.startswith("inbound")
    sender = creds.peer_sender if inbound else creds.user
    if kind.endswith("-auth"):
        token = base64.b64encode(f"\x00{creds.user}\x00{creds.password}".encode())
        if rng.random() < 0.8:
            steps.append(Step(b"AUTH PLAIN " + token + CRLF))
        else:
            steps.append(Step(b"AUTH LOGIN\r\n" + base64.b64encode(creds.user.encode()) + CRLF
                              + base64.b64encode(creds.password.encode()) + CRLF, expect=3))
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        if rng.random() < 0.3:
            steps.append(Step(_smtp_noise(rng, creds)))
        env_sender = sender if rng.random() < 0.85 else rng.choice(["", creds.local_rcpts[0], "x@unknown.example"])
        rcpts = _rcpts(rng, creds) if rng.random() < 0.4 else [creds.local_rcpts[0]]
        lines = [Step(b"MAIL FROM:<" + env_sender.encode() + b">" + _mail_params(rng) + CRLF)]
        lines += [Step(b"RCPT TO:<" + r.encode() + b">" + CRLF) for r in rcpts]
        steps += lines
        steps.append(Step(b"DATA\r\n", "data"))
        body = message(rng, sender, rcpts[0])
        steps.append(Step(_dot_stuff(body) + b"\r\n.\r\n", "body"))
    for _ in range(rng.choice([0, 0, 1, 2])):
        steps.append(Step(_smtp_noise(rng, creds)))
    if rng.random() < 0.8:
        steps.append(Step(b"QUIT\r\n"))
    script = Script(index, "smtp", kind, steps)
    mutate(rng, script)
    return script


# --- IMAP ----------------------------------------------------------------------------------------

def _astring(rng: random.Random, value: str) -> bytes:
    raw = value.encode()
    form = rng.choice(["atom", "quoted", "literal", "literal+"])
    if form == "atom" and re.fullmatch(rb"[A-Za-z0-9._@-]+", raw):
        return raw
    if form in ("quoted", "atom"):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    plus = b"+" if form == "literal+" else b""
    return b"{" + str(len(raw)).encode() + plus + b"}\r\n" + raw


FOLDERS = ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Fz", "Fz/Sub", "Fz.dot", "&AOk-t&AOk-", "inbox",
           "Nope", "a b", "\u00e9t\u00e9", "*", "%", "Fz/*", "", "/", "..", "Fz/../x", "&AB", "&", "&-", "a&Jjo"]
FETCH_ITEMS = ["FLAGS", "UID", "BODY.PEEK[HEADER]", "BODY[]", "BODYSTRUCTURE", "ENVELOPE", "RFC822.SIZE",
               "BODY[1.2.MIME]", "BINARY[1]", "BODY.PEEK[]<0.100>", "BODY[HEADER.FIELDS (SUBJECT FROM)]",
               "INTERNALDATE", "FAST", "ALL", "BODY[TEXT]<5.0>", "BODY[999]", "RFC822"]
SEQUENCES = ["1", "1:*", "*", "1,3:5", "4294967295", "0", "-1", "1:4294967296", "*:1", "2:3,*", "x"]
SEARCH_KEYS = ["ALL", f"TEXT {CANARY}", f"SUBJECT \"{CANARY}\"", "OR SEEN UNSEEN", "NOT DELETED", "LARGER 100",
               "SINCE 1-Jan-2026", "HEADER X-Fz y", "UID 1:*", "CHARSET UTF-8 BODY x", "CHARSET X-BAD ALL",
               "BEFORE 31-Feb-2026", "SMALLER -5", "(" * 60 + "ALL" + ")" * 60]


def _imap_post(rng: random.Random, creds: Credentials, tag: str, plain_login: bool) -> bytes:
    folder = rng.choice(FOLDERS)
    items = " ".join(rng.sample(FETCH_ITEMS, rng.randint(1, 4)))
    choices: list[bytes] = [
        b"SELECT " + _astring(rng, folder), b"EXAMINE " + _astring(rng, folder),
        b"SELECT INBOX", b"SELECT INBOX", b"LIST \"\" *", b"LIST \"\" %", b"LSUB \"\" *",
        b"STATUS " + _astring(rng, folder) + b" (MESSAGES UIDNEXT UNSEEN)",
        f"FETCH {rng.choice(SEQUENCES)} ({items})".encode(), f"UID FETCH 1:* ({items})".encode(),
        f"SEARCH {rng.choice(SEARCH_KEYS)}".encode(), f"UID SEARCH {rng.choice(SEARCH_KEYS)}".encode(),
        f"STORE {rng.choice(SEQUENCES)} +FLAGS (\\Seen $Fz)".encode(), b"EXPUNGE", b"CLOSE", b"UNSELECT",
        f"COPY {rng.choice(SEQUENCES)} ".encode() + _astring(rng, folder), b"MOVE 1 Trash", b"CHECK",
        b"CREATE " + _astring(rng, folder), b"DELETE " + _astring(rng, folder), b"SUBSCRIBE Fz",
        b"RENAME " + _astring(rng, folder) + b" " + _astring(rng, rng.choice(FOLDERS)),
        b"NAMESPACE", b"ID (\"name\" \"fz\")", b"ENABLE UTF8=ACCEPT", b"GETQUOTAROOT INBOX", b"NOOP",
        b"IDLE\r\nDONE", b"CAPABILITY", b"FOO BAR", b"LOGIN again x",
    ]
    if plain_login:
        choices.append(b"STARTTLS")
    if rng.random() < 0.15:
        msg = message(rng, "labo@b.mssante.test", creds.imap_user)
        plus = rng.choice([b"", b"+"])
        return (tag.encode() + b" APPEND INBOX (\\Seen) {" + str(len(msg)).encode() + plus + b"}\r\n"
                + msg + CRLF)
    return tag.encode() + b" " + rng.choice(choices) + CRLF


def _imap_pre(rng: random.Random, creds: Credentials, tag: str) -> bytes:
    huge = rng.choice([10**6, 10**9, 4294967295, 10**30])
    return tag.encode() + b" " + rng.choice([
        b"CAPABILITY", b"NOOP", b"LOGOUT", b"ID NIL", b"SELECT INBOX", b"LIST \"\" *",
        b"LOGIN " + _astring(rng, creds.imap_user) + b" " + _astring(rng, CANARY),
        b"AUTHENTICATE PLAIN\r\n" + base64.b64encode(f"\x00{creds.imap_user}\x00{CANARY}".encode()),
        b"AUTHENTICATE XOAUTH2", b"LOGIN {" + str(huge).encode() + b"}\r\n" + b"x" * rng.randint(0, 5000),
        b"APPEND INBOX {" + str(huge).encode() + b"+}\r\n" + b"y" * rng.randint(0, MAX_LITERAL_SENT),
        b"\x00\xff garbage", b"", b"LOGIN a", b"STARTTLS extra",
    ]) + CRLF


def imap_script(rng: random.Random, index: int, creds: Credentials) -> Script:
    kind = rng.choices(IMAP_KINDS, IMAP_WEIGHTS)[0]
    steps = [Step(b"", "greeting")]
    n = 0

    def tag() -> str:
        nonlocal n
        n += 1
        return f"a{n:03d}"

    for _ in range(rng.randint(0, 3) if kind == "imap-pre" else rng.randint(0, 1)):
        steps.append(Step(_imap_pre(rng, creds, tag())))
    if kind in ("imap-starttls", "imap-auth"):
        steps.append(Step(f"{tag()} STARTTLS\r\n".encode(), "starttls"))
    if kind.endswith("-auth"):
        if rng.random() < 0.8:
            login = b" LOGIN " + _astring(rng, creds.imap_user) + b" " + _astring(rng, creds.imap_password)
        else:
            login = b" AUTHENTICATE PLAIN\r\n" + base64.b64encode(
                f"\x00{creds.imap_user}\x00{creds.imap_password}".encode())
        steps.append(Step(tag().encode() + login + CRLF))
        for _ in range(rng.randint(1, 10)):
            steps.append(Step(_imap_post(rng, creds, tag(), kind == "imap-auth")))
    elif kind == "imap-starttls":
        for _ in range(rng.randint(1, 4)):
            steps.append(Step(_imap_pre(rng, creds, tag())))
    if rng.random() < 0.7:
        steps.append(Step(f"{tag()} LOGOUT\r\n".encode()))
    script = Script(index, "imap", kind, steps)
    mutate(rng, script)
    return script


# --- known findings --------------------------------------------------------------------------------

_MUTF7_BAD = re.compile(rb"&(?![A-Za-z0-9+,]*-)")
_FOLDER_CMD = re.compile(rb"(?i)\b(SELECT|EXAMINE|STATUS|CREATE|DELETE|RENAME|COPY|MOVE|SUBSCRIBE|APPEND)\b")
_MAIL_8BIT = re.compile(rb"(?i)MAIL[^\n]*[\x80-\xff]")
_ODD_CREATE = re.compile(rb"(?i)\b(CREATE|RENAME)\b")


def known_issue(script: Script) -> str | None:
    """The ``KNOWN_ISSUES`` key a session would hit (a deliberately wide net), or None."""
    wire = b"".join(script.wire())
    if script.protocol == "imap":
        if b"&" in wire and _FOLDER_CMD.search(wire):
            return "imap-mutf7"
        if _ODD_CREATE.search(wire):
            return "imap-create-odd"
        if re.search(rb"\{\d{6,}\+?\}", wire):
            return "imap-prelogin-literal"
        return None
    if _MAIL_8BIT.search(b"".join(s.data for s in script.steps if s.action != "body")):
        return "smtp-8bit-mail-from"
    if any(s.action == "body" and s.force for s in script.steps) or "swap" in script.mutations:
        return "smtp-body-after-refused-data"
    if any(s.action == "data" and s.data != b"DATA\r\n" for s in script.steps):
        return "smtp-body-after-refused-data"
    return None


class Generator:
    """Session ``index`` of ``seed``: 3 in 5 SMTP, 2 in 5 IMAP."""

    def __init__(self, seed: int, creds: Credentials, *, avoid_known: bool = False) -> None:
        self.seed = seed
        self.creds = creds
        self.avoid_known = avoid_known

    @staticmethod
    def protocol(index: int) -> str:
        return "smtp" if index % 5 < 3 else "imap"

    def script(self, index: int) -> Script:
        rng = random.Random(f"{self.seed}:{index}")
        for _ in range(50):
            if self.protocol(index) == "smtp":
                script = smtp_script(rng, index, self.creds)
            else:
                script = imap_script(rng, index, self.creds)
            script.known = known_issue(script)
            if not (self.avoid_known and script.known):
                return script
        return Script(index, self.protocol(index), "skipped", [], known="avoided")
