"""Benchmark: import a national-size MSSanté extract and print lines/s and peak memory.

Generates the extract with ``../shared/tools/gen_annuaire.py mss --rows N --bad 6``
into a temporary folder, initialises an operator there, and times
``directory.importers.import_file`` on SQLite, then on PostgreSQL when
``MSSGW_TEST_PG_URL`` names a server (a fresh database is created and dropped).
Each import runs in a child process, so the peak RSS printed
(``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child) is the import's own.
A second run of the same file measures the idempotent re-import.

Usage: ``.venv/bin/python bench/bench_import.py [--rows 535000] [--batch-size 5000] [--no-pg]``
Targets: < 60 s and < 300 MB peak RSS for 535,000 lines on SQLite on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT.parent / "shared" / "tools" / "gen_annuaire.py"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from directory.db import make_engine, session_factory
from directory.importers import import_file
url, path, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
engine = make_engine(url)
started = time.perf_counter()
report = import_file(session_factory(engine), path, local_domains=["hcl.mssante.fr"], batch_size=batch)
wall = time.perf_counter() - started
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine.dispose()
print(json.dumps({"lines": report.lines, "created": report.created, "updated": report.updated,
                  "unchanged": report.unchanged, "skipped": len(report.skipped), "seconds": wall,
                  "peak_mb": peak_kb / 1024}))
"""


def generate(rows: int, folder: Path) -> Path:
    path = folder / "Extraction_Correspondance_MSSante_bench.txt"
    with path.open("wb") as out:
        subprocess.run([sys.executable, str(GENERATOR), "mss", "--rows", str(rows), "--bad", "6"], stdout=out,
                       check=True)
    return path


def init_home(home: Path, url: str) -> None:
    env = dict(os.environ, MSSGW_DATABASE_URL=url)
    subprocess.run([sys.executable, "-m", "cli.main", "--data-dir", str(home), "init", "--domain",
                    "hcl.mssante.fr"], cwd=ROOT, env=env, check=True, capture_output=True)


def run_import(url: str, path: Path, batch: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, url, str(path), str(batch)], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def report(store: str, label: str, r: dict[str, float]) -> None:
    print(f"{store:<10} {label:<9} {int(r['lines']):>8} lines  {r['seconds']:7.1f} s  "
          f"{r['lines'] / r['seconds']:>9,.0f} lines/s  peak {r['peak_mb']:6.0f} MB  "
          f"created {int(r['created'])} updated {int(r['updated'])} unchanged {int(r['unchanged'])} "
          f"skipped {int(r['skipped'])}")


def bench_store(store: str, url: str, path: Path, home: Path, batch: int) -> None:
    init_home(home, url)
    report(store, "first", run_import(url, path, batch))
    report(store, "re-run", run_import(url, path, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=535_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--no-pg", action="store_true", help="Skip PostgreSQL even if MSSGW_TEST_PG_URL is set.")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="mssgw-bench-") as tmp:
        folder = Path(tmp)
        path = generate(args.rows, folder)
        print(f"extract: {path.stat().st_size / 1e6:.0f} MB, {args.rows} rows (+6 bad, +repeats), "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs")
        bench_store("sqlite", f"sqlite:///{folder / 'bench.db'}", path, folder / "home-sqlite", args.batch_size)
        server = os.environ.get("MSSGW_TEST_PG_URL")
        if server and not args.no_pg:
            from sqlalchemy import create_engine, text

            name = f"mssgw_bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(server.replace("postgresql://", "postgresql+psycopg://", 1),
                                  isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                url = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
                bench_store("postgresql", url, path, folder / "home-pg", args.batch_size)
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
        else:
            print("postgresql: skipped (set MSSGW_TEST_PG_URL to a server URL to include it)")


if __name__ == "__main__":
    main()
