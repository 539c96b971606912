"""Pages/s of a 5,000-page local crawl with no ingestion and with items + requests + logs.

    python bench/pages.py [--pages 5000] [--pairs 3]

The site (bench/_site.py) runs in a process of its own; each crawl
(bench/_pages_crawl.py) in a fresh process, alternating: none, ingest, none,
ingest, ... Each ingest crawl writes into a fresh PostgreSQL database, which
comes from SCRAPY_INGEST_BENCH_PG_DSN (or SCRAPY_INGEST_TEST_PG_DSN), else a
throwaway local server like the tests'. Prints every run, then the medians
and the ratio. The target (issue 3): ingest >= 0.90 of none, every page's
item, request and log records stored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import services  # noqa: E402  (tests/services.py: the throwaway PostgreSQL)

MODES = ("none", "ingest")


def postgres(stack: contextlib.ExitStack) -> str:
    url = os.environ.get("SCRAPY_INGEST_BENCH_PG_DSN")
    return url or services.start_postgres(stack)[0]


def site(stack: contextlib.ExitStack, pages: int) -> str:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_site.py"), str(pages)], stdout=subprocess.PIPE, text=True
    )
    stack.callback(process.wait)
    stack.callback(process.terminate)
    assert process.stdout is not None
    return f"http://127.0.0.1:{process.stdout.readline().strip()}"


def crawl(mode: str, base_url: str, pages: int, db_url: str | None) -> dict[str, float]:
    args = [sys.executable, str(HERE / "_pages_crawl.py"), mode, base_url, str(pages)]
    if db_url:
        args.append(db_url)
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=5_000)
    parser.add_argument("--pairs", type=int, default=3)
    options = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with contextlib.ExitStack() as stack:
        admin = postgres(stack)
        base_url = site(stack, options.pages)
        for n in range(options.pairs):
            for mode in MODES:
                db_url = None
                if mode == "ingest":
                    db_url = services.with_database(admin, services.create_database(admin))
                result = crawl(mode, base_url, options.pages, db_url)
                if result["pages"] != options.pages:
                    sys.exit(f"{mode} run {n}: fetched {result['pages']} of {options.pages}")
                if mode == "ingest" and not (
                    result["items_stored"] == result["requests_stored"] == options.pages
                    and result["logs_stored"]
                ):
                    sys.exit(f"ingest run {n}: not everything was stored: {result}")
                runs[mode].append(result)
                print(f"run {n + 1} {mode:<6} {json.dumps(result)}", flush=True)
    print()
    base = statistics.median(r["pages_per_s"] for r in runs["none"])
    print(f"{'mode':<8}{'pages/s':>10}{'ratio':>8}")
    for mode in MODES:
        rate = statistics.median(r["pages_per_s"] for r in runs[mode])
        print(f"{mode:<8}{rate:>10.0f}{rate / base:>8.3f}")


if __name__ == "__main__":
    main()
