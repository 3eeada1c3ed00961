"""A bounded, seeded fuzz run against a real ``mssgw serve``: 3,000 SMTP and 2,000 IMAP sessions.

Why here and not only in a bench: every parser of untrusted bytes must have a fuzz
test (ARCHITECTURE, rule 9), and the gateway as a whole is the parser an attacker
meets. The sessions are mutated valid transcripts (``fuzz_inputs``) on submission
with STARTTLS, submissions (implicit TLS), inbound (plain and with a trusted peer's
certificate), IMAP before and after login, 40 at a time. Afterwards the gateway must:
be alive; serve a legitimate client (AUTH + submission, IMAP LOGIN + SELECT) within
1 s; have stayed under its starting RSS + 300 MB; have logged no traceback and no
client text (the canary); have sent no exception text in a reply and no IMAP
``[SERVERBUG]``; have hung no SMTP session (IMAP sessions of the one fuzz account may wait on
their own account's FETCH/SEARCH turns, see ``STEP_TIMEOUT``: they are reported); and hold in
its queue every message it answered 250.

The seed is random unless ``MSSGW_FUZZ_SEED`` is set; it is printed, and in every
failure message, with each finding's session index: replay one session with
``bench/fuzz_gateway.py --seed S --only I`` (the long run lives there too).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from pathlib import Path

import fuzz_harness
import pytest
from fuzz_harness import Fuzzer, Stats, findings_markdown
from fuzz_inputs import CANARY, KNOWN_ISSUES, Generator
from fuzz_world import (
    CREDS,
    GatewayProcess,
    legitimate_client,
    prepare_home,
    queue_ids,
    read_rss_kib,
    rss_sampler,
    warm_fuzz_account,
)

SMTP_SESSIONS = 3_000
IMAP_SESSIONS = 2_000
CONCURRENCY = 40
#: A guard against a wedged gateway, not a speed target: every session must run (sessions not
#: started by then count as missing). On CI's 2 cores the run takes 5 to 6 minutes.
FUZZ_BUDGET = 780.0
RSS_GROWTH_KIB = 300 * 1024
#: A reply owed longer than this is a hang. Every IMAP fuzz session logs in to the same account,
#: whose folder the run fills with pathological messages (thousands of fields, deep MIME): its
#: FETCH 1:* and SEARCH take turns per account by design (gateway/imap/fetch.py, search.py), so
#: its own sessions may wait on each other for tens of seconds. Other accounts may not: the
#: legitimate client below must be served within 1 s.
STEP_TIMEOUT = 60.0
SESSION_TIMEOUT = 120.0


def seed() -> int:
    return int(os.environ.get("MSSGW_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


def findings_text(stats: Stats, seed: int, categories: tuple[str, ...]) -> str:
    out = []
    for category in categories:
        out += [f.render(seed) for f in stats.findings.get(category, [])[:3]]
    return "\n".join(out)[:6000]


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_fuzzed_sessions_leave_the_gateway_healthy(tmp_path: Path, pki_template: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSSGW_DATABASE_URL", raising=False)
    # IMAP sessions of the one fuzz account wait on that account's own turns: they must not mark
    # IMAP as wedged and stop the run. A real freeze is caught by the legitimate client (another
    # account, 1 s) and by the run's own budget.
    monkeypatch.setattr(fuzz_harness, "WEDGE_HANGS", 10_000)
    s = seed()
    print(f"MSSGW_FUZZ_SEED={s}")
    prepared = prepare_home(tmp_path / "home", pki_template)
    log = tmp_path / "gateway.log"
    gateway = GatewayProcess(prepared.home, log)
    await gateway.start()
    problems: list[str] = []
    try:
        await legitimate_client(prepared.target)  # its first logins pay Argon2 here, not in the 1 s below
        await warm_fuzz_account(prepared.target)
        fuzzer = Fuzzer(prepared.target, Generator(s, CREDS), concurrency=CONCURRENCY,
                        step_timeout=STEP_TIMEOUT, session_timeout=SESSION_TIMEOUT)
        stats = fuzzer.stats
        stats.rss_kib["before"] = read_rss_kib(gateway.pid)
        sampler = asyncio.create_task(rss_sampler(gateway.pid, stats.rss_kib))
        loop = asyncio.get_running_loop()
        await fuzzer.run(range(SMTP_SESSIONS + IMAP_SESSIONS), deadline=loop.time() + FUZZ_BUDGET,
                         alive=gateway.alive)
        sampler.cancel()
        stats.rss_kib["after"] = read_rss_kib(gateway.pid)
        if not gateway.alive():
            stats.events["crash"] += 1
            problems.append(f"the gateway died during the run (exit status {gateway.proc.returncode})")  # type: ignore[union-attr]
        else:
            try:
                await asyncio.wait_for(legitimate_client(prepared.target), 1.0)
            except Exception as exc:
                problems.append(f"a legitimate client was not served within 1 s: {type(exc).__name__} {exc}")
    finally:
        await gateway.stop()
    print(stats.report())

    if stats.count("smtp") < SMTP_SESSIONS or stats.count("imap") < IMAP_SESSIONS:
        problems.append(f"only {stats.count('smtp')} SMTP / {stats.count('imap')} IMAP sessions ran "
                        f"(wedged: {sorted(stats.wedged) or 'none'}, budget {FUZZ_BUDGET:.0f}s, load average "
                        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    # A wedged protocol (WEDGE_HANGS hangs) or any SMTP hang is a failure. A few IMAP sessions of
    # the one fuzz account may wait past STEP_TIMEOUT behind that account's own FETCH/SEARCH turns
    # (by design, see STEP_TIMEOUT): they are reported, and the legitimate client above, on
    # another account, proves the gateway kept serving others.
    if stats.hangs_by_protocol["smtp"]:
        problems.append(f"{stats.events['hang']} sessions hung (wedged: {sorted(stats.wedged) or 'none'}):\n"
                        + findings_text(stats, s, ("hang",)))
    elif stats.events["hang"]:
        print(f"{stats.events['hang']} IMAP sessions of the fuzz account waited over {STEP_TIMEOUT:.0f}s "
              f"for their account's turn:\n{findings_text(stats, s, ('hang',))[:2000]}")
    for category, what in (("leak", "replies carried exception text"),
                           ("serverbug", "IMAP sessions ended by an unhandled server error ([SERVERBUG])"),
                           ("harness", "sessions broke the fuzzer itself")):
        if stats.events[category]:
            problems.append(f"{stats.events[category]} {what}:\n{findings_text(stats, s, (category,))}")
    growth = stats.rss_kib.get("max", 0) - stats.rss_kib["before"]
    if growth > RSS_GROWTH_KIB:
        problems.append(f"RSS grew by {growth // 1024} MiB (bound {RSS_GROWTH_KIB // 1024} MiB)")
    text = log.read_text(errors="replace")
    if "Traceback" in text:
        i = text.index("Traceback")
        problems.append(f"{text.count('Traceback')} tracebacks in the gateway log; first:\n{text[i:i + 1500]}")
    if CANARY in text:
        lines = [line for line in text.splitlines() if CANARY in line]
        problems.append(f"client text reached the log {len(lines)} times; first: {lines[0][:300]!r}")
    missing = set(stats.accepted) - queue_ids(prepared.home)
    if missing:
        problems.append(f"{len(missing)} messages answered 250 are not in the queue: {sorted(missing)[:5]}")
    findings = tmp_path / "findings.md"
    findings.write_text(findings_markdown(s, stats, problems, KNOWN_ISSUES))
    assert len(stats.accepted) > 0, "no fuzzed message was accepted: the transcripts no longer reach DATA"
    assert not problems, f"seed {s} (MSSGW_FUZZ_SEED={s} to replay):\n" + "\n\n".join(
        re.sub(r"\n{3,}", "\n\n", p) for p in problems) + f"\n\nall findings, with the bytes to replay them: {findings}"
