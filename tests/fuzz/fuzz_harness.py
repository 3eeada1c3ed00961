"""Run fuzz session scripts against a live gateway over raw sockets and count what came back.

Each script (``fuzz_inputs``) is played on its own connection (asyncio streams, TLS
by ``start_tls`` after STARTTLS or implicit), from a random loopback source address
127.0.0.2-254 so that the login throttling of one fuzz session never locks out the
legitimate client checked afterwards (127.0.0.1). The runner keeps a small model of
what the server has been sent (complete SMTP command lines, DATA up to its
terminator, IMAP commands with their literals) to know how many replies to wait for:

* a **hang** is a step that expected a reply and got no byte at all within the step
  timeout, or a session that overran its own timeout;
* a **short** is a step that got some but not all the replies it expected;
* a **drop** is the server closing the connection while replies were still expected
  without saying goodbye first (421, 221, IMAP BYE);
* a **leak** is a reply carrying Python exception text; a **serverbug** is IMAP's
  ``[SERVERBUG]`` answer to an exception nobody handled (``local-error``: SMTP's 451 4.3.0).

Whatever is found keeps the session index, the mutations and the bytes sent, so a
finding replays with the same seed and index. A protocol that hangs
``WEDGE_HANGS`` times is considered wedged and not fuzzed further in the run (so a
frozen loop costs seconds, not the whole run).
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_inputs import Generator, Script

WEDGE_HANGS = 10
BAD_LIMIT = 5  # pymap's IMAPConfig.bad_command_limit
SAMPLES = 12
LEAK = re.compile(rb"Traceback|File \"|\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception)\b|<class '|object at 0x")
QUEUED = re.compile(rb"^250[ -].*queued as (\S+)")
_STARTTLS = re.compile(rb"(?im)^(\S+) STARTTLS\r?$")
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r?\n$")


@dataclass(frozen=True)
class Target:
    """Where the gateway listens (ports of 0 are not fuzzed) and the TLS material a client needs."""

    host: str
    submission: int
    submissions: int
    inbound: int
    imap: int
    imaps: int
    ca: Path
    peer_cert: Path | None = None  # an operator certificate the inbound listener trusts
    peer_key: Path | None = None

    def context(self, client_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if client_cert and self.peer_cert and self.peer_key:
            ctx.load_cert_chain(self.peer_cert, self.peer_key)
        return ctx

    def port(self, script: Script) -> int:
        return {"submission": self.submission, "submission-auth": self.submission,
                "submissions-auth": self.submissions, "inbound": self.inbound, "inbound-tls": self.inbound,
                "imap-pre": self.imap, "imap-starttls": self.imap, "imap-auth": self.imap,
                "imaps-auth": self.imaps}[script.kind]


@dataclass
class Finding:
    category: str
    index: int
    kind: str
    mutations: list[str]
    detail: str
    wire: list[bytes]
    known: str | None = None  # the KNOWN_ISSUES key the session's bytes match, if any

    def render(self, seed: int) -> str:
        shown = [w if len(w) <= 400 else w[:300] + b"...<%d bytes>..." % len(w) + w[-60:] for w in self.wire]
        lines = [f"- {self.category}: seed {seed} session {self.index} ({self.kind}, mutations "
                 f"{','.join(self.mutations) or 'none'}{', matches known ' + self.known if self.known else ''}): "
                 f"{self.detail}"]
        lines += [f"    {i}: {w!r}" for i, w in enumerate(shown)]
        return "\n".join(lines)


@dataclass
class Stats:
    sessions: Counter[str] = field(default_factory=Counter)
    smtp: Counter[str] = field(default_factory=Counter)
    imap: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)  # drops, hangs, shorts, leaks, tls ...
    known: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, int] = field(default_factory=dict)  # queue id -> session index
    findings: dict[str, list[Finding]] = field(default_factory=dict)
    wedged: set[str] = field(default_factory=set)
    hangs_by_protocol: Counter[str] = field(default_factory=Counter)
    rss_kib: dict[str, int] = field(default_factory=dict)  # before, max, after
    started: float = field(default_factory=time.monotonic)

    def add(self, finding: Finding) -> None:
        self.events[finding.category] += 1
        bucket = self.findings.setdefault(finding.category, [])
        if len(bucket) < SAMPLES:
            bucket.append(finding)

    def count(self, protocol: str) -> int:
        """Sessions of ``protocol`` that were played (not those skipped as wedged or avoided)."""
        return sum(n for k, n in self.sessions.items()
                   if k.startswith(protocol) and not k.endswith(("-skipped-wedged", "-avoided")))

    def report(self) -> str:
        def fmt(c: Counter[str]) -> str:
            return " ".join(f"{k}={v}" for k, v in sorted(c.items())) or "-"

        rss = " ".join(f"{k}={v // 1024}MiB" for k, v in self.rss_kib.items()) or "-"
        return "\n".join([
            f"elapsed {time.monotonic() - self.started:.0f}s sessions smtp={self.count('smtp')} "
            f"imap={self.count('imap')} ({fmt(self.sessions)})",
            f"smtp replies {fmt(self.smtp)}",
            f"imap replies {fmt(self.imap)}",
            f"events drops={self.events['drop']} hangs={self.events['hang']} shorts={self.events['short']} "
            f"leaks={self.events['leak']} serverbugs={self.events['serverbug']} crashes={self.events['crash']} harness-errors={self.events['harness']} "
            f"({fmt(self.events)})",
            f"accepted {len(self.accepted)} known-issue sessions ({fmt(self.known)}) "
            f"wedged {','.join(sorted(self.wedged)) or '-'}",
            f"rss {rss}",
        ])


def findings_markdown(seed: int, stats: Stats, problems: list[str], known: dict[str, str]) -> str:
    """Everything found, with the bytes to replay it, as a Markdown page."""
    lines = [f"# Fuzz findings (seed {seed})", "", "```", stats.report(), "```", ""]
    lines += [f"- {p}" for p in problems]
    for category, findings in sorted(stats.findings.items()):
        lines += ["", f"## {category} ({stats.events[category]})", ""]
        lines += [f.render(seed) for f in findings]
    lines += ["", "Known issues (being fixed elsewhere):", *[f"- {k}: {v}" for k, v in known.items()]]
    return "\n".join(lines) + "\n"


class SmtpModel:
    """What the server still owes us: one reply per complete command line, one per complete DATA."""

    def __init__(self) -> None:
        self.buffer = b""
        self.in_data = False
        self.data_done = False
        self.greeting = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        self._scan_data()

    def _scan_data(self) -> None:
        if self.in_data and not self.data_done:
            end = (b"\r\n" + self.buffer).find(b"\r\n.\r\n")
            if end >= 0:
                self.buffer = self.buffer[max(0, end + 3):]
                self.data_done = True

    def expected(self) -> int:
        if self.in_data:
            return 1 if self.data_done else 0
        return self.greeting + self.buffer.count(b"\n")

    def on_reply(self, code: int) -> None:
        if self.greeting:
            self.greeting = 0
        elif self.in_data:
            self.in_data = self.data_done = False
        else:
            self.buffer = self.buffer.split(b"\n", 1)[1] if b"\n" in self.buffer else b""
            if code == 220:  # STARTTLS accepted: plaintext pipelined after it is discarded (RFC 3207 4.2)
                self.buffer = b""
            if code == 354:
                self.in_data = True
                self._scan_data()


class ImapModel:
    """Tagged responses owed: complete commands, literals and the SASL response or IDLE's DONE included."""

    def __init__(self) -> None:
        self.buffer = b""
        self.pending = 0
        self.greeting = 0
        self.starttls_tags: set[bytes] = set()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        self.starttls_tags.update(m.group(1) for m in _STARTTLS.finditer(data))
        while (end := self._command_end(0)) > 0:
            line = self.buffer[:end]
            words = line.split()
            verb = words[1].upper() if len(words) > 1 else b""
            if verb == b"IDLE" or (verb == b"AUTHENTICATE" and len(words) == 3):
                # the command ends with the client's next line (DONE, the SASL response)
                nl = self.buffer.find(b"\n", end)
                if nl < 0:
                    return
                end = nl + 1
            self.buffer = self.buffer[end:]
            self.pending += 1

    def _command_end(self, pos: int) -> int:
        """Where the command starting at ``pos`` ends (lines joined by literals), or -1 if incomplete."""
        while True:
            nl = self.buffer.find(b"\n", pos)
            if nl < 0:
                return -1
            m = _LITERAL.search(self.buffer, pos, nl + 1)
            if m is None:
                return nl + 1
            pos = nl + 1 + int(m.group(1))
            if pos > len(self.buffer):
                return -1

    def expected(self) -> int:
        return self.greeting + self.pending

    def on_tagged(self) -> None:
        self.pending = max(0, self.pending - 1)


class Closed(Exception):
    """The server ended the session (after a goodbye or not)."""


class Session:
    """One connection: reading SMTP replies or IMAP responses, TLS upgrades."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.bye = False  # the server said goodbye (221, 421, BYE): a close is expected
        self.step = 0  # index of the step being played (in findings)
        self.tls_next = False  # the server accepted STARTTLS
        self.bad_run = 0  # consecutive IMAP BAD: pymap hangs up after 5 (bad_command_limit), without BYE

    async def read_line(self, timeout: float) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise Closed
        return line

    async def upgrade(self, ctx: ssl.SSLContext, timeout: float) -> None:
        await asyncio.wait_for(self.writer.start_tls(ctx, server_hostname="localhost"), timeout)

    def abort(self) -> None:
        try:
            self.writer.transport.abort()
        except TypeError:  # "SSLProtocol._abort() takes 1 positional argument" (CPython 3.11, seen under fuzz)
            self.writer.transport.close()


class Fuzzer:
    """Plays ``Generator`` scripts with ``concurrency`` sessions at once and fills ``stats``."""

    def __init__(self, target: Target, generator: Generator, *, concurrency: int = 30,
                 step_timeout: float = 10.0, session_timeout: float = 40.0,
                 trace: Callable[[int, str, bytes], None] | None = None) -> None:
        self.target = target
        self.trace = trace  # (session index, ">" sent or "<" received, bytes): for replaying one session
        self.gen = generator
        self.concurrency = concurrency
        self.step_timeout = step_timeout
        self.session_timeout = session_timeout
        self.stats = Stats()
        self._ctx = {False: target.context(False), True: target.context(True)}

    async def run(self, indices: Iterable[int], *, deadline: float | None = None,
                  alive: Callable[[], bool] = lambda: True) -> Stats:
        """Play the sessions of ``indices``; stop taking new ones after ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        todo = iter(indices)

        async def worker() -> None:
            for index in todo:
                if (deadline is not None and loop.time() > deadline) or not alive():
                    return
                protocol = self.gen.protocol(index)
                if self.stats.wedged >= {"smtp", "imap"}:
                    return
                if protocol in self.stats.wedged:
                    self.stats.sessions[f"{protocol}-skipped-wedged"] += 1
                    continue
                await self.play(index)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return self.stats

    async def play(self, index: int) -> None:
        script = self.gen.script(index)
        if script.known:
            self.stats.known[script.known] += 1
        if not script.steps:
            self.stats.sessions[f"{script.protocol}-avoided"] += 1
            return
        self.stats.sessions[f"{script.protocol}-{script.kind}"] += 1
        try:
            await asyncio.wait_for(self._session(script), self.session_timeout)
        except TimeoutError:
            self._hang(script, f"session overran its {self.session_timeout:.0f}s timeout")
        except Exception as exc:
            self._found("harness", script, "".join(traceback.format_exception_only(exc)).strip()[:300])

    def _found(self, category: str, script: Script, detail: str) -> None:
        self.stats.add(Finding(category, script.index, script.kind, script.mutations, detail, script.wire(),
                               script.known))

    def _hang(self, script: Script, detail: str) -> None:
        self._found("hang", script, detail)
        self.stats.hangs_by_protocol[script.protocol] += 1
        if self.stats.hangs_by_protocol[script.protocol] >= WEDGE_HANGS:
            self.stats.wedged.add(script.protocol)

    async def _session(self, script: Script) -> None:
        source = f"127.0.0.{random.Random(script.index).randint(2, 254)}"
        tls = self._ctx[script.client_cert] if script.implicit_tls else None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.target.host, self.target.port(script), ssl=tls, local_addr=(source, 0),
                server_hostname="localhost" if tls else None), self.step_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._found("connect", script, type(exc).__name__)
            return
        session = Session(reader, writer)
        try:
            if script.protocol == "smtp":
                await self._smtp(script, session)
            else:
                await self._imap(script, session)
        except Closed:
            pass
        except (ConnectionError, ssl.SSLError) as exc:
            self._found("drop", script, f"connection error {type(exc).__name__}")
        finally:
            session.abort()

    def _check(self, script: Script, line: bytes) -> None:
        if self.trace:
            self.trace(script.index, "<", line)
        if LEAK.search(line):
            self._found("leak", script, f"reply {line[:200]!r}")
        elif b"[SERVERBUG]" in line:  # pymap's answer to an exception it did not expect
            self._found("serverbug", script, f"reply {line[:200]!r}")
        elif line.startswith(b"451 4.3.0"):  # the SMTP edge's answer to an unexpected exception
            self._found("local-error", script, f"reply {line[:200]!r}")

    async def _exchange(self, script: Script, session: Session, model: SmtpModel | ImapModel,
                        data: bytes, read_one: Callable[[], object]) -> list[bytes]:
        """Write ``data``, then read until the model is owed nothing; returns the final reply lines."""
        if data:
            session.writer.write(data)
            if self.trace:
                self.trace(script.index, ">", data)
        model.feed(data)
        got: list[bytes] = []
        deadline = asyncio.get_running_loop().time() + self.step_timeout
        while model.expected() > 0 and not session.bye:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                got.append(await asyncio.wait_for(read_one(), remaining))  # type: ignore[arg-type]
            except TimeoutError:
                category = "short" if got else "hang"
                detail = f"step {session.step}: {model.expected()} replies still owed after {self.step_timeout:.0f}s"
                if category == "hang":
                    self._hang(script, detail)
                else:
                    self._found("short", script, detail)
                raise Closed from None
            except Closed:
                if session.bye:
                    raise
                category = "bad-limit-close" if session.bad_run >= BAD_LIMIT else "drop"
                self._found(category, script, f"step {session.step}: closed with {model.expected()} replies owed")
                raise
        return got

    # --- SMTP ----------------------------------------------------------------------------------

    async def _smtp(self, script: Script, session: Session) -> None:
        model = SmtpModel()
        last = 0

        async def read_reply() -> bytes:
            nonlocal last
            while True:
                line = await session.read_line(self.step_timeout)
                self._check(script, line)
                if m := QUEUED.match(line):
                    self.stats.accepted[m.group(1).decode(errors="replace")] = script.index
                if len(line) >= 4 and line[3:4] == b"-":
                    continue
                code = int(line[:3]) if line[:3].isdigit() else 0
                self.stats.smtp[f"{code // 100}xx" if code else "malformed"] += 1
                last = code
                model.on_reply(code)
                if code in (221, 421):
                    session.bye = True
                return line

        for session.step, step in enumerate(script.steps):
            if step.action == "greeting":
                model.greeting = 1
            elif step.action == "body" and last != 354 and not step.force:
                continue
            elif step.action == "close":
                session.writer.write(step.data)
                self.stats.events["early-close"] += 1
                return
            try:
                await self._exchange(script, session, model, step.data, read_reply)
            except Closed:
                return
            if session.bye:
                await self._expect_eof(script, session)
                return
            if last == 220 and step.action != "greeting":  # the server now expects a TLS handshake
                if step.action != "starttls" or not await self._upgrade(script, session):
                    self.stats.events["tls-desync"] += step.action != "starttls"
                    return
                model = SmtpModel()

    async def _upgrade(self, script: Script, session: Session) -> bool:
        try:
            await session.upgrade(self._ctx[script.client_cert], self.step_timeout)
            return True
        except (ssl.SSLError, ConnectionError, TimeoutError, TypeError) as exc:  # TypeError: as in abort()
            self.stats.events["tls-failed"] += 1
            self._found("tls", script, f"upgrade failed {type(exc).__name__}")
            return False

    async def _expect_eof(self, script: Script, session: Session) -> None:
        """After a goodbye the server must close the connection (not leave it open)."""
        try:
            while await asyncio.wait_for(session.reader.read(65536), self.step_timeout):
                pass
        except TimeoutError:
            self._hang(script, "connection left open after goodbye")
        except (ConnectionError, ssl.SSLError):
            pass

    # --- IMAP ----------------------------------------------------------------------------------

    async def _imap(self, script: Script, session: Session) -> None:
        model = ImapModel()

        async def read_response() -> bytes:
            while True:
                line = await session.read_line(self.step_timeout)
                while m := _LITERAL.search(line):  # a literal in a response: its bytes, then the line goes on
                    body = await asyncio.wait_for(session.reader.readexactly(int(m.group(1))), self.step_timeout)
                    line = line + body + await session.read_line(self.step_timeout)
                self._check(script, line[:2000])
                parts = line.split(b" ", 2)
                if parts[0] == b"+":
                    self.stats.imap["+"] += 1
                    continue
                word = parts[1].upper().strip() if len(parts) > 1 else b""
                if parts[0] == b"*":
                    if word == b"BAD" and not model.greeting:  # a command without a readable tag
                        self.stats.imap["BAD"] += 1
                        session.bad_run += 1
                        model.on_tagged()
                        return line
                    if word == b"BYE":
                        self.stats.imap["BYE"] += 1
                        session.bye = True
                    if model.greeting and word in (b"OK", b"PREAUTH", b"BYE"):
                        model.greeting = 0
                        return line
                    continue
                self.stats.imap[word.decode(errors="replace") if word in (b"OK", b"NO", b"BAD") else "other"] += 1
                if word == b"OK" and parts[0] in model.starttls_tags:
                    model.buffer, model.pending = b"", 1  # what was pipelined after STARTTLS is discarded
                    session.tls_next = True
                # pymap resets its count on OK only (a NO raised as an error leaves it as it is)
                session.bad_run = 0 if word == b"OK" else session.bad_run + (word == b"BAD")
                model.on_tagged()
                return line

        for session.step, step in enumerate(script.steps):
            if step.action == "greeting":
                model.greeting = 1
            elif step.action == "close":
                session.writer.write(step.data)
                self.stats.events["early-close"] += 1
                return
            try:
                await self._exchange(script, session, model, step.data, read_response)
            except Closed:
                return
            if session.bye:
                await self._expect_eof(script, session)
                return
            if session.tls_next:  # the server now expects a TLS handshake
                if step.action != "starttls" or not await self._upgrade(script, session):
                    self.stats.events["tls-desync"] += step.action != "starttls"
                    return
                session.tls_next = False
                model = ImapModel()
