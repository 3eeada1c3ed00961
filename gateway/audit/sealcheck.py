"""Checking the audit trail against its seals: which seal is broken, and how.

Each line of the seal file must follow the one before it (``prev``), carry a valid
signature by a known operator certificate, and still match the records:

- ``deleted-all``: the table is empty although seals exist;
- ``truncated``: the trail ends below a sealed head (the last records were deleted);
- ``renumbered``: the sealed head record (same timestamp) now has another seq;
- ``rewritten``: the record at a sealed seq no longer has the sealed hash (edited,
  then every later hash recomputed);
- ``purged-early``: a sealed record is gone as if purged, but it is younger than
  ``audit.retention_days`` or no retention record covers it;
- ``count``: the number of records up to the sealed head changed;
- ``unlinked``, ``signature``, ``signer-unknown``, ``unreadable``: the seal line itself;
- ``break``: a gateway found records it had written deleted or changed (the unsealed tail
  cut back by the database owner) and said so, in an ``audit-chain-break`` record and in
  its next seal's ``breaks``; the lost seqs are named. Seal 0 means a break record not
  yet sealed. A break stays reported: it is the evidence.

- ``other-chain``: a seal names the head of another node's chain (``chains``) and that
  record is now missing above that chain's head, or has another hash.

A home's seals cover its node's chain (``audit.node``; "" for a lone node).
Records after the newest good seal are the unsealed tail: not an error, reported.
A seal older than a legitimate purge is checked through the retention record (its
``last_removed_hash`` when it names the sealed seq).

Errors: none raised for tampering (it is the result); database errors propagate.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.audit.models import AuditRecord
from gateway.audit.seal import (
    GENESIS,
    canonical,
    fingerprint,
    line_digest,
    read_head,
    read_seals,
    seals_path,
    signature_holds,
    ts_text,
)
from gateway.audit.watch import BREAK_EVENT, describe

_CHUNK = 500
_REQUIRED = ("head_seq", "head_hash", "head_ts", "first_seq", "count", "signer", "prev", "sig", "sealed_at")


@dataclass(frozen=True)
class SealProblem:
    seal: int  # ordinal of the seal line, from 1
    kind: str
    message: str


@dataclass
class SealReport:
    seals: int = 0  # seal lines read
    good: int = 0  # seals with a valid signature that follow the previous line
    sealed_seq: int | None = None  # highest head sealed by a good seal
    unsealed_tail: int = 0
    problems: list[SealProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, limit: int = 10) -> list[str]:
        out: list[str] = []
        if not self.seals:
            out.append("seals: none yet")
        elif self.ok:
            out.append(f"seals: {self.good} checked, all hold (sealed through seq {self.sealed_seq})")
        out += [f"seal #{p.seal} BROKEN ({p.kind}): {p.message}" if p.seal else
                f"trail BROKEN ({p.kind}): {p.message}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            out.append(f"... and {len(self.problems) - limit} more broken seal(s)")
        if self.unsealed_tail:
            out.append(f"unsealed tail ({self.unsealed_tail} records)")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"seals": self.seals, "good": self.good, "sealed_seq": self.sealed_seq,
                "unsealed_tail": self.unsealed_tail,
                "problems": [{"seal": p.seal, "kind": p.kind, "message": p.message} for p in self.problems]}


def _signers(folder: Path, current: Path) -> dict[str, x509.Certificate]:
    found: dict[str, x509.Certificate] = {}
    paths = [current, *sorted(folder.glob("*.pem"))] if folder.is_dir() else [current]
    for path in paths:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue
        found[fingerprint(cert)] = cert
    return found


def _parse(ordinal: int, text: str, prev_digest: str, signers: dict[str, x509.Certificate],
           report: SealReport) -> dict[str, Any] | None:
    """The seal's fields when the line is well formed, linked and validly signed; else a problem."""
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict) or any(k not in fields for k in _REQUIRED):
            raise ValueError("fields missing")
        int(fields["head_seq"])
        sig = base64.b64decode(str(fields["sig"]), validate=True)
    except (ValueError, TypeError, binascii.Error):
        report.problems.append(SealProblem(ordinal, "unreadable", "the line is not a seal"))
        return None
    if fields["prev"] != prev_digest:
        report.problems.append(SealProblem(ordinal, "unlinked",
                                           "it does not follow the seal before it (a seal was removed or reordered)"))
    cert = signers.get(str(fields["signer"]))
    if cert is None:
        report.problems.append(SealProblem(ordinal, "signer-unknown",
                                           f"signed by certificate {str(fields['signer'])[:16]}..., which is not "
                                           "the operator certificate nor in audit/signers/"))  # fmt: skip
        return None
    if not signature_holds(cert, canonical(fields), sig):
        report.problems.append(SealProblem(ordinal, "signature",
                                           f"bad signature on the seal of seq {fields['head_seq']} (forged or altered)"))
        return None
    return fields  # genuinely signed: its records are checked even when a seal before it is missing


def _retention(session: Session, node: str = "") -> tuple[int, str | None]:
    """The highest ``removed_through`` of the chain's retention records, with its last removed hash."""
    best: tuple[int, str | None] = (0, None)
    for raw in session.scalars(select(AuditRecord.detail).where(AuditRecord.node == node,
                                                                AuditRecord.event == "retention")):
        try:
            detail = json.loads(raw or "{}")
            through = int(detail.get("removed_through", 0))
        except (ValueError, TypeError):
            continue
        if through > best[0]:
            best = (through, detail.get("last_removed_hash"))
    return best


def _seq_with_ts(session: Session, head_ts: str, node: str = "") -> int | None:
    """Where the record with the sealed head's timestamp is now (a renumbering keeps timestamps)."""
    when = datetime.fromisoformat(head_ts)
    rows = session.execute(select(AuditRecord.seq, AuditRecord.ts).where(AuditRecord.node == node,
        AuditRecord.ts >= when - timedelta(seconds=1), AuditRecord.ts <= when + timedelta(seconds=1)))
    for seq, ts in rows:
        if ts_text(ts) == head_ts:
            return int(seq)
    return None


def _check_against_records(session: Session, seals: Sequence[tuple[int, dict[str, Any]]], report: SealReport, *,
                           retention: timedelta, now: datetime, node: str = "") -> None:
    head = read_head(session, node=node)
    if head is None:
        ordinal, s = seals[-1]
        report.problems.append(SealProblem(ordinal, "deleted-all", f"the table is empty, but this seal covers "
                                           f"{s['count']} records through seq {s['head_seq']}"))  # fmt: skip
        return
    sealed = {int(s["head_seq"]) for _, s in seals}
    hashes: dict[int, str] = {}
    ordered = sorted(sealed)
    for i in range(0, len(ordered), _CHUNK):
        chunk = ordered[i: i + _CHUNK]
        hashes.update((int(q), str(h)) for q, h in session.execute(
            select(AuditRecord.seq, AuditRecord.hash).where(AuditRecord.node == node, AuditRecord.seq.in_(chunk))))
    purged_through, purged_hash = _retention(session, node)
    young = now - retention
    for ordinal, s in seals:
        seq, digest = int(s["head_seq"]), str(s["head_hash"])
        if seq in hashes:
            if hashes[seq] == digest:
                continue
            moved = _seq_with_ts(session, str(s["head_ts"]), node)
            if moved is not None and moved != seq:
                report.problems.append(SealProblem(ordinal, "renumbered",
                                                   f"the record sealed as seq {seq} is now seq {moved}"))
            else:
                report.problems.append(SealProblem(ordinal, "rewritten",
                                                   f"record seq {seq} does not have the sealed hash (edited, "
                                                   "later hashes recomputed)"))  # fmt: skip
        elif seq > head.head_seq:
            moved = _seq_with_ts(session, str(s["head_ts"]), node)
            if moved is not None:
                report.problems.append(SealProblem(ordinal, "renumbered",
                                                   f"the record sealed as seq {seq} is now seq {moved}"))
            else:
                report.problems.append(SealProblem(ordinal, "truncated",
                                                   f"the trail ends at seq {head.head_seq}, below the sealed "
                                                   f"seq {seq}"))  # fmt: skip
        elif seq < head.first_seq:
            if datetime.fromisoformat(str(s["head_ts"])) >= young:
                report.problems.append(SealProblem(ordinal, "purged-early",
                                                   f"sealed seq {seq} is gone but younger than the retention "
                                                   "period"))  # fmt: skip
            elif seq > purged_through:
                report.problems.append(SealProblem(ordinal, "purged-early",
                                                   f"sealed seq {seq} is gone and no retention record covers it"))
            elif seq == purged_through and purged_hash != digest:
                report.problems.append(SealProblem(ordinal, "rewritten",
                                                   f"the retention record's hash of seq {seq} is not the sealed one"))
        else:
            report.problems.append(SealProblem(ordinal, "truncated", f"sealed seq {seq} is missing"))
    # The newest seal's count, when nothing was purged since it was made.
    ordinal, s = seals[-1]
    seq = int(s["head_seq"])
    if int(s["first_seq"]) == head.first_seq and seq in hashes:
        now_count = int(session.scalar(select(func.count()).select_from(AuditRecord)
                                       .where(AuditRecord.node == node, AuditRecord.seq <= seq)) or 0)  # fmt: skip
        if now_count != int(s["count"]):
            report.problems.append(SealProblem(ordinal, "count", f"{s['count']} records were sealed through seq "
                                               f"{seq}, {now_count} are there now"))  # fmt: skip
    if report.sealed_seq is not None and head.head_seq > report.sealed_seq:
        report.unsealed_tail = head.head_seq - report.sealed_seq


def _check_other_chains(session: Session, seals: Sequence[tuple[int, dict[str, Any]]], report: SealReport) -> None:
    """Heads of other nodes' chains a seal vouched for: still there with that hash, or purged."""
    named: dict[tuple[str, int], tuple[int, str]] = {}
    for ordinal, s in seals:
        others = s.get("chains")
        if not isinstance(others, dict):
            continue
        for name, head in others.items():
            try:
                named[(str(name), int(head[0]))] = (ordinal, str(head[1]))
            except (TypeError, ValueError, IndexError):
                continue
    for (name, seq), (ordinal, digest) in sorted(named.items()):
        found = session.scalar(select(AuditRecord.hash).where(AuditRecord.node == name, AuditRecord.seq == seq))
        if found == digest:
            continue
        if found is not None:
            report.problems.append(SealProblem(ordinal, "other-chain", f"record seq {seq} of chain {name!r} does "
                                               "not have the hash this seal saw (edited)"))  # fmt: skip
            continue
        bounds = session.execute(select(func.min(AuditRecord.seq), func.max(AuditRecord.seq))
                                 .where(AuditRecord.node == name)).first()  # fmt: skip
        low, high = (bounds[0], bounds[1]) if bounds is not None else (None, None)
        if low is not None and seq < int(low):
            continue  # purged with its chain's retention (that chain's own seals check the proof)
        report.problems.append(SealProblem(ordinal, "other-chain", f"record seq {seq} of chain {name!r}, seen by "
                                           f"this seal, is gone (that chain now ends at {high or 0})"))  # fmt: skip


def _check_breaks(session: Session, seals: Sequence[tuple[int, dict[str, Any]]], report: SealReport,
                  node: str = "") -> None:
    """Breaks a gateway recorded: named in a seal, or as an ``audit-chain-break`` record (once each)."""
    seen: set[tuple[Any, Any, Any]] = set()

    def add(ordinal: int, detail: Any) -> None:
        if not isinstance(detail, dict):
            detail = {}
        key = (detail.get("lost_from"), detail.get("lost_through"), detail.get("expected_hash"))
        if key in seen:
            return
        seen.add(key)
        report.problems.append(SealProblem(ordinal, "break", describe(detail)))

    for ordinal, s in seals:
        for detail in s.get("breaks") or []:
            add(ordinal, detail)
    heads = sorted((int(s["head_seq"]), ordinal) for ordinal, s in seals)
    for seq, raw in session.execute(select(AuditRecord.seq, AuditRecord.detail)
                                    .where(AuditRecord.node == node, AuditRecord.event == BREAK_EVENT)
                                    .order_by(AuditRecord.seq)):  # fmt: skip
        try:
            detail = json.loads(raw or "{}")
        except ValueError:
            detail = {}
        covering = next((ordinal for head_seq, ordinal in heads if head_seq >= int(seq)), 0)
        add(covering, detail)


def check_seals(session: Session, path: Path, *, current_cert: Path, retention: timedelta,
                now: datetime | None = None, lines: Sequence[str] | None = None, node: str = "") -> SealReport:
    """Check every seal of ``path`` (or its ``lines``, read earlier) and the records against them.

    Read the lines BEFORE the session's snapshot begins (``seal_lines``): a seal made while
    the check runs could otherwise name a head the snapshot does not see yet (a false
    "truncated").
    """
    report = SealReport()
    signers = _signers(path.parent / "signers", current_cert)
    prev = GENESIS
    good: list[tuple[int, dict[str, Any]]] = []
    texts = lines if lines is not None else seal_lines(path)
    for ordinal, text in enumerate(texts, 1):
        report.seals = ordinal
        fields = _parse(ordinal, text, prev, signers, report)
        prev = line_digest(text)
        if fields is not None:
            good.append((ordinal, fields))
    report.good = len(good)
    # Each seal covers the chain of the node that made it ("node"; none: the lone node's): nodes
    # that share a home (one seal file) each seal their own chain.
    by_node: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for ordinal, fields in good:
        by_node.setdefault(str(fields.get("node") or ""), []).append((ordinal, fields))
    mine = by_node.pop(node, [])
    _check_breaks(session, mine, report, node)
    _check_other_chains(session, good, report)
    when = now or datetime.now(UTC)
    for other, seals in sorted(by_node.items()):
        aside = SealReport()
        _check_against_records(session, seals, aside, retention=retention, now=when, node=other)
        report.problems += aside.problems
    if mine:
        report.sealed_seq = max(int(s["head_seq"]) for _, s in mine)
        _check_against_records(session, mine, report, retention=retention, now=when, node=node)
    else:
        head = read_head(session, node=node)
        report.unsealed_tail = head.count if head is not None else 0
    return report


def seal_lines(path: Path) -> list[str]:
    return [text for _, text in read_seals(path)]


def check_home(session: Session, settings: Any, *, now: datetime | None = None,
               lines: Sequence[str] | None = None) -> SealReport:
    """``check_seals`` with an operator's seal file, certificate and retention period."""
    pki = settings.pki_dir
    return check_seals(session, seals_path(settings.home),
                       current_cert=settings.path("tls", "operator_cert", pki / "operator.pem"),
                       retention=timedelta(days=settings.audit.retention_days), now=now,
                       lines=lines, node=settings.audit.node)  # fmt: skip
