"""The long fault-injection run of the delivery core: thousands of messages, drops and SIGKILLs, then the proof.

The same run as ``tests/e2e/test_fault_injection.py`` (``tests/e2e/fault_harness.py``: two real
``mssgw serve`` operators, a proxy between A and B dropping connections at seeded SMTP points,
each operator SIGKILLed ``--kills`` times and restarted, random recipient sets over every
protection group), sized for a long run.  Prints the checker's counts, the drops by kind, the
flow time and messages per second (submitted messages over the time from the first submission
to both queues drained, kills and retries included: a figure under faults, not a throughput
benchmark).  Exits 1 when the checker found a lost, duplicated or stuck (message, recipient).

``--pg URL`` names a PostgreSQL server with the right to create databases: each operator gets a
fresh database there (dropped at the end unless ``--keep``); without it both use SQLite.

    .venv/bin/python bench/fault_run.py --messages 1000 --kills 20 --seed 7 [--pg URL]
                                        [--drop-probability 0.2] [--keep DIR] [--timeout 900]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))


def _databases(server: str) -> tuple[dict[str, str], object]:
    """One fresh database per operator on ``server``; returns their URLs and the admin engine."""
    from sqlalchemy import create_engine, text

    driver = server.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = create_engine(driver, isolation_level="AUTOCOMMIT")
    names = {op: f"mssgw_faultrun_{op}_{uuid.uuid4().hex[:10]}" for op in ("a", "b")}
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = driver.rsplit("/", 1)[0]
    return {op: f"{base}/{name}" for op, name in names.items()}, admin


def _drop(admin: object, urls: dict[str, str]) -> None:
    from sqlalchemy import Engine, text

    assert isinstance(admin, Engine)
    with admin.connect() as conn:
        for url in urls.values():
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of each operator.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--drop-probability", type=float, default=0.2, help="Share of A->B connections cut.")
    parser.add_argument(
        "--pg", metavar="URL", help="PostgreSQL server URL (a database per operator is made)."
    )
    parser.add_argument(
        "--window", type=int, default=24, help="Most messages open in A's queue while submitting."
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="Bound of each wait (a start, the drain)."
    )
    parser.add_argument("--keep", type=Path, help="Build the operators here and keep them (homes, logs).")
    args = parser.parse_args(argv)

    from fault_harness import HarnessError, run_fault_injection

    root = args.keep or Path(tempfile.mkdtemp(prefix="mssgw-faultrun-"))
    urls: dict[str, str] | None = None
    admin: object = None
    if args.pg:
        urls, admin = _databases(args.pg)
    store = "postgresql" if urls else "sqlite"
    print(f"fault run: {args.messages} messages, {args.kills} kills of each operator, seed {args.seed}, "
          f"drop probability {args.drop_probability}, {store}, homes in {root}", flush=True)  # fmt: skip
    try:
        report = asyncio.run(run_fault_injection(
            root, messages=args.messages, kills=args.kills, seed=args.seed, drop_probability=args.drop_probability,
            database_urls=urls, window=args.window, timeout=args.timeout,
        ))  # fmt: skip
    except HarnessError as exc:
        print(f"fault run did not complete: {exc}", file=sys.stderr)
        return 2
    finally:
        if urls and not args.keep:
            _drop(admin, urls)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(report.summary())
    c = report.counts
    rate = c["submitted"] / report.seconds if report.seconds else 0.0
    pairs = c["pairs"] / report.seconds if report.seconds else 0.0
    print(f"flow {report.seconds:.1f} s: {rate:.2f} messages/s, {pairs:.2f} (message, recipient) pairs/s "
          f"under faults ({store})")  # fmt: skip
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
