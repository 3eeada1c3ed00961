"""Benchmark: recipient decisions against a national-size directory (µs per decision, p50/p99).

Generates an MSSanté extract (``../shared/tools/gen_annuaire.py mss --rows N``) and
the whitelist, loads both into a fresh SQLite operator home (or PostgreSQL when
``MSSGW_TEST_PG_URL`` is set and ``--pg`` given), then times
``facts.recipient_facts`` + ``decide_recipient`` for a mix of addresses (known
remote, local, unknown in a trusted domain, consumer, unknown domain), each in its
own short read transaction as the SMTP edge does, and finally the
``mssgw domains check`` command end to end (process start included).

Usage: ``.venv/bin/python bench/bench_check.py [--rows 535000] [--decisions 20000] [--pg]``
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT.parent / "shared" / "tools" / "gen_annuaire.py"
sys.path.insert(0, str(ROOT))


def generate(kind: str, args: list[str], out: Path) -> Path:
    with out.open("wb") as f:
        subprocess.run([sys.executable, str(GENERATOR), kind, *args], stdout=f, check=True)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=535_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--pg", action="store_true", help="Use PostgreSQL (MSSGW_TEST_PG_URL) instead of SQLite.")
    args = parser.parse_args()

    from directory import admin, facts
    from directory.importers import import_file
    from gateway.operator import init_operator
    from gateway.policy.recipients import decide_recipient

    with tempfile.TemporaryDirectory(prefix="mssgw-bench-") as tmp:
        folder = Path(tmp)
        home = folder / "home"
        pg_admin = None
        env = dict(os.environ)
        if args.pg:
            from sqlalchemy import create_engine, text

            server = os.environ["MSSGW_TEST_PG_URL"]
            name = f"mssgw_bench_{uuid.uuid4().hex[:8]}"
            pg_admin = create_engine(server.replace("postgresql://", "postgresql+psycopg://", 1),
                                  isolation_level="AUTOCOMMIT")
            with pg_admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            env["MSSGW_DATABASE_URL"] = os.environ["MSSGW_DATABASE_URL"] = (
                server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name)
        else:
            os.environ.pop("MSSGW_DATABASE_URL", None)
            env.pop("MSSGW_DATABASE_URL", None)
        try:
            init_operator(home, domain="hcl.mssante.fr", hostname="localhost")
            from cli.context import AppContext

            app = AppContext(str(home))
            mss = generate("mss", ["--rows", str(args.rows)], folder / "Extraction_Correspondance_MSSante_b.txt")
            wl = generate("whitelist", ["--domains", "12"], folder / "listeblanche.xml")
            started = time.perf_counter()
            report = import_file(app.sessions, mss, local_domains=app.settings.domains)
            import_file(app.sessions, wl, local_domains=app.settings.domains)
            print(f"loaded {report.created} mailboxes in {time.perf_counter() - started:.1f} s "
                  f"({'postgresql' if args.pg else 'sqlite'})")

            with app.transaction() as session:
                known = [row["address"] for row in admin.list_mailboxes(session, limit=2000)]
            rng = random.Random(1)
            mix = known + [f"nobody{i}@medecin.mssante.fr" for i in range(200)] + \
                [f"x{i}@gmail.com" for i in range(100)] + [f"x{i}@yahoo.fr" for i in range(100)] + \
                [f"x{i}@unknown{i}.example" for i in range(100)]
            timings: list[float] = []
            accepted = 0
            for _ in range(args.decisions):
                address = rng.choice(mix)
                t0 = time.perf_counter()
                with app.read() as session:
                    found = facts.recipient_facts(session, address)
                decision = decide_recipient(found)
                timings.append((time.perf_counter() - t0) * 1e6)
                accepted += decision.accepted
            print(f"recipient_facts + decide_recipient: {len(timings)} decisions ({accepted} accepted), "
                  f"p50 {statistics.median(timings):.0f} µs, p99 {percentile(timings, 0.99):.0f} µs, "
                  f"mean {statistics.fmean(timings):.0f} µs")
            app.close()

            runs = []
            for address in (known[0], "x@gmail.com", "nobody@medecin.mssante.fr"):
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "cli.main", "--data-dir", str(home), "domains", "check",
                                      address], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
                runs.append(time.perf_counter() - t0)
                print(f"  mssgw domains check {address}: exit {out.returncode}: {out.stdout.strip()[:90]}")
            print(f"mssgw domains check (CLI, process start included): median {statistics.median(runs) * 1000:.0f} ms")
        finally:
            if pg_admin is not None:
                with pg_admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                pg_admin.dispose()


if __name__ == "__main__":
    main()
