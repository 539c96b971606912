"""Fixed cost per crawl: ``scrapy crawl`` of a spider that yields nothing, without and with the
add-on, start to exit.

    python bench/empty_crawl.py [--pairs 7] [--backend sqlite|postgres] [--fresh] [--no-bytecode]

Each crawl is a whole ``scrapy crawl`` process in a throwaway project, in alternating order
(none, ingest, none, ingest, ...), after one pair that is not counted (it warms the disk cache
and creates the tables). The spider fetches one ``data:`` URL and yields nothing; ``ingest``
is the same crawl with ``ADDONS = {"scrapy_ingest.IngestAddon": 0}``, into the default SQLite
database (``sqlite:///ingest.sqlite3`` in the project) or, with ``--backend postgres``, into one
PostgreSQL database (from SCRAPY_INGEST_BENCH_PG_DSN, else a throwaway local server like the
tests'). With ``--fresh``, every add-on crawl gets a new database (and creates its tables).
The crawls import compiled modules, as from an installed package (pip compiles them): Python
writes them into a directory of the run's own (PYTHONPYCACHEPREFIX) at the pair that is not
counted, even where PYTHONDONTWRITEBYTECODE is set. With ``--no-bytecode``, the environment
decides: under PYTHONDONTWRITEBYTECODE, a source checkout's modules (this package's, in an
editable install) are compiled again by every crawl.
Each add-on crawl must leave one more finished job row, and no crawl may log an error.

Prints every run: its wall time (process start to exit) and CPU time (user + system, of the
crawl process and of the children it waited for, such as the writer process), and the crawl
process's own CPU time (``own``: what the project's settings module reads of its process
alone in an ``atexit`` handler, so without the interpreter's teardown that follows; the writer
process runs beside the crawl where a core is free), then the medians and the differences.
The target (issue 26): ingest at most 0.3 s slower than none.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the same PostgreSQL as bench/items.py (which puts tests/, services.py's home, on sys.path)
from items import postgres, services

MODES = ("none", "ingest")
#: the target: what the add-on may add to a crawl, in seconds
TARGET = 0.3

SETTINGS = """\
import atexit
import os
import resource
import sys

BOT_NAME = "bench_empty"
SPIDER_MODULES = ["bench_empty.spiders"]
ROBOTSTXT_OBEY = False
TELNETCONSOLE_ENABLED = False
LOG_LEVEL = "WARNING"
if os.environ.get("BENCH_INGEST_DATABASE_URL"):
    ADDONS = {"scrapy_ingest.IngestAddon": 0}
    if os.environ["BENCH_INGEST_DATABASE_URL"] != "default":
        INGEST_DATABASE_URL = os.environ["BENCH_INGEST_DATABASE_URL"]


def _own_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"bench-own-cpu {usage.ru_utime + usage.ru_stime:.6f}", file=sys.stderr, flush=True)


atexit.register(_own_cpu)
"""

SPIDER = """\
import scrapy


class EmptySpider(scrapy.Spider):
    name = "empty"
    start_urls = ["data:,"]

    def parse(self, response):
        return []
"""


def make_project(root: Path) -> Path:
    """A Scrapy project with the one spider, as ``scrapy startproject`` lays it out."""
    root.mkdir()
    (root / "scrapy.cfg").write_text("[settings]\ndefault = bench_empty.settings\n")
    package = root / "bench_empty"
    (package / "spiders").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "settings.py").write_text(SETTINGS)
    (package / "spiders" / "__init__.py").write_text("")
    (package / "spiders" / "empty.py").write_text(SPIDER)
    return root


def crawl(project: Path, db_url: str | None, pycache: Path | None) -> tuple[float, float, float]:
    """Run ``scrapy crawl empty`` in *project* (with the add-on when *db_url* is given: a URL,
    or ``default``), its bytecode kept in *pycache* if given; return its wall and CPU seconds,
    and the CPU seconds of the crawl process alone."""
    env = {k: v for k, v in os.environ.items() if k != "BENCH_INGEST_DATABASE_URL"}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    if db_url:
        env["BENCH_INGEST_DATABASE_URL"] = db_url
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "scrapy", "crawl", "empty"],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # wait4: the CPU time of this process and of the children it waited for (the writer)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    own = re.search(r"^bench-own-cpu ([0-9.]+)$", output, re.MULTILINE)
    if process.returncode != 0 or " ERROR: " in output or "Traceback" in output or not own:
        sys.exit(f"the crawl failed (exit code {process.returncode}):\n{output[-4000:]}")
    return wall, usage.ru_utime + usage.ru_stime, float(own[1])


def finished_jobs(db_url: str) -> int:
    """The finished job rows in the database of *db_url* (0 before its first crawl)."""
    query = "SELECT count(*) FROM ingest_jobs WHERE status = 'finished'"
    if db_url.startswith("sqlite:///"):
        path = Path(db_url.removeprefix("sqlite:///"))
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return int(conn.execute(query).fetchone()[0])
    import psycopg

    with psycopg.connect(db_url) as conn:
        exists = conn.execute("SELECT to_regclass('ingest_jobs')").fetchone()
        if exists is None or exists[0] is None:
            return 0
        found = conn.execute(query).fetchone()
        return int(found[0]) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--fresh", action="store_true", help="a new database for every add-on crawl"
    )
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="no bytecode directory of the run's own: PYTHONDONTWRITEBYTECODE decides",
    )
    options = parser.parse_args()
    runs: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        project = make_project(scratch / "project")
        pycache = None if options.no_bytecode else scratch / "pycache"
        admin = postgres(stack) if options.backend == "postgres" else ""

        def new_database() -> str:
            if admin:
                return services.with_database(admin, services.create_database(admin))
            (project / "ingest.sqlite3").unlink(missing_ok=True)
            return f"sqlite:///{project / 'ingest.sqlite3'}"

        db_url = new_database()
        for n in range(options.pairs + 1):  # run 0 warms up
            for mode in MODES:
                if mode == "ingest" and options.fresh and n:
                    db_url = new_database()
                before = finished_jobs(db_url) if mode == "ingest" else 0
                # SQLite: the default URL, as in a project that sets none
                target = None if mode == "none" else db_url if admin else "default"
                wall, cpu, own = crawl(project, target, pycache)
                if mode == "ingest" and finished_jobs(db_url) != before + 1:
                    sys.exit(f"run {n}: the add-on crawl left no finished job row in {db_url}")
                if n:
                    runs[mode].append((wall, cpu, own))
                label = f"run {n}" if n else "warm-up"
                print(
                    f"{label:<8} {mode:<7} wall {wall:6.3f} s  cpu {cpu:6.3f} s  own {own:6.3f} s",
                    flush=True,
                )
    print()
    wall, cpu, own = (
        {mode: statistics.median(run[i] for run in runs[mode]) for mode in MODES} for i in range(3)
    )
    print(f"{'median':<12}{'wall s':>8}{'cpu s':>8}{'own s':>8}")
    for mode in MODES:
        print(f"{mode:<12}{wall[mode]:>8.3f}{cpu[mode]:>8.3f}{own[mode]:>8.3f}")
    extra = wall["ingest"] - wall["none"]
    cpu_extra, own_extra = cpu["ingest"] - cpu["none"], own["ingest"] - own["none"]
    print(f"{'difference':<12}{extra:>8.3f}{cpu_extra:>8.3f}{own_extra:>8.3f}")
    print(f"ratio {wall['ingest'] / wall['none']:.3f}; target: difference at most {TARGET} s")


if __name__ == "__main__":
    main()
