"""Without a Twisted reactor (``TWISTED_REACTOR_ENABLED = False``, Scrapy 2.15 and later): the
crawl runs on an asyncio loop, and Scrapy forbids importing ``twisted.internet.reactor``. Every
component works there: items, requests, logs and the job row are stored through
AsyncCrawlerProcess, AsyncCrawlerRunner under ``asyncio.run()`` and ``scrapy crawl``, in SQLite
and PostgreSQL (a writer process each), and in SQLite from writer threads
(``INGEST_WRITER_PROCESS = False``); the metrics, the proxy and retry middlewares and
INGEST_DURABLE too."""

from __future__ import annotations

import re
import sqlite3
import urllib.request
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import Crawl, Database, run_crawl, wait_for
from conftest import service_missing
from services import ServiceUnavailable, running_tinyproxy
from test_addon_commands import _ingest_rows, _scrapy, project  # noqa: F401 (a fixture)

from scrapy_ingest._compat import _scrapy_version

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = [
    pytest.mark.crawl,
    pytest.mark.skipif(
        _scrapy_version() < (2, 15), reason="Scrapy runs without a reactor from 2.15 on"
    ),
]


def crawl_args(site: LocalSite, url: str, tmp_path: Path, mode: str, **settings: Any) -> dict:
    return {
        "base_url": site.base_url,
        "pages": 5,
        "per_page": 20,
        "reactor": mode,
        "settings": {
            "INGEST_DATABASE_URL": url,
            "INGEST_SPILL_DIR": str(tmp_path / "spill"),
            **settings,
        },
    }


def log(crawl: Crawl) -> str:
    return crawl.log_path.read_text(errors="replace")


def assert_stored(url: str, result: Any, *, items: int, logs: bool = True) -> None:
    assert result.returncode == 0, result.describe()
    assert result.reactor is None, result.reactor  # no reactor was installed
    assert "Traceback" not in result.output, result.describe()
    assert " ERROR: " not in result.output, result.describe()
    db = Database(url)
    assert db.count("ingest_items") == items == result.stats["item_scraped_count"]
    assert db.count("ingest_requests") == result.stats["ingest/requests/stored"] > 0
    if logs:  # AsyncCrawlerRunner configures no logging: Scrapy's INFO lines are not emitted
        assert db.count("ingest_logs") == result.stats["ingest/logs/stored"] > 0
    [(status, reason, stored)] = db.query(
        "SELECT status, close_reason, items_count FROM ingest_jobs"
    )
    assert (status, reason, stored) == ("finished", "finished", items)


@pytest.mark.parametrize("mode", ["none", "none-runner"])
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_crawl_without_a_reactor_stores_everything(
    mode: str, database: str, site: LocalSite, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue({"sqlite": "sqlite_url", "postgres": "pg_url"}[database])
    result = run_crawl(crawl_args(site, url, tmp_path, mode), tmp_path)
    assert_stored(url, result, items=100, logs=mode == "none")


@pytest.mark.parametrize("mode", ["none", "none-runner"])
def test_a_crawl_without_a_reactor_stores_everything_from_writer_threads(
    mode: str, site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    args = crawl_args(site, sqlite_url, tmp_path, mode, INGEST_WRITER_PROCESS=False)
    result = run_crawl(args, tmp_path)
    assert_stored(sqlite_url, result, items=100, logs=mode == "none")


def test_scrapy_crawl_without_a_reactor(project: Path, site: LocalSite) -> None:  # noqa: F811
    catalog = site.url("/catalog?n=3")
    crawl = _scrapy(
        project, "crawl", "catalog", "-a", f"start={catalog}", "-s", "TWISTED_REACTOR_ENABLED=0"
    )
    assert crawl.returncode == 0, crawl.stderr
    assert "Not using a Twisted reactor" in crawl.stderr  # Scrapy's DEBUG line
    # Scrapy itself warns that its aiohttp download handler (its default then) is experimental
    assert not re.search(r"\[scrapy_ingest[.\w]*\] WARNING:|\] ERROR:", crawl.stderr), crawl.stderr
    rows = _ingest_rows(project / "ingest.sqlite3")
    assert (rows["ingest_jobs"], rows["ingest_items"], rows["ingest_requests"]) == (1, 3, 2)
    assert rows["ingest_logs"] > 0
    with sqlite3.connect(project / "ingest.sqlite3") as conn:
        status, reason = conn.execute("SELECT status, close_reason FROM ingest_jobs").fetchone()
    conn.close()
    assert (status, reason) == ("finished", "finished")


def test_every_component_works_without_a_reactor(
    site: LocalSite, pg_url: str, tmp_path: Path
) -> None:
    """The jobs heartbeat, the metrics server, INGEST_DURABLE's group commit, the backoff retry
    middleware (the tree's /status/500 and its timeout) and the proxy pool (a real tinyproxy):
    the timers, loops and threads of each, on the asyncio loop."""
    with ExitStack() as stack:
        try:
            proxy = stack.enter_context(running_tinyproxy("user", "pw-reactorless"))
        except ServiceUnavailable as exc:
            service_missing(str(exc))
        settings = {
            "INGEST_JOB_HEARTBEAT": 0.2,
            "INGEST_METRICS_ENABLED": True,
            "INGEST_METRICS_PORT": 0,
            "INGEST_DURABLE": True,
            "INGEST_RETRY_ENABLED": True,
            "RETRY_TIMES": 1,
            "INGEST_PROXY_LIST": [proxy.url],
        }
        args = crawl_args(site, pg_url, tmp_path, "none", **settings)
        args.update(spider="tree")
        crawl = Crawl(args, tmp_path / "crawl")
        try:
            port = wait_for(
                lambda: (
                    re.search(r"Prometheus metrics on http://[^:]+:(\d+)", log(crawl))
                    or not crawl.running
                ),
                timeout=60,
                what="the metrics server",
            )
            assert crawl.running, log(crawl)
            with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=5) as page:
                assert b"scrapy_ingest_" in page.read()
            result = crawl.wait()
        finally:
            crawl.kill()
    stats = result.stats
    assert result.returncode == 0, result.describe()
    assert result.reactor is None
    # the tree's page 3 fails in the spider and its 3 s page times out, on purpose (Scrapy's
    # ERRORs); none of ours, and nothing asks for a reactor
    assert "forbidden" not in result.output, result.describe()
    assert not re.search(r"\[scrapy_ingest[.\w]*\] ERROR:", result.output), result.describe()
    assert stats["ingest/jobs/heartbeats"] >= 1, stats
    assert stats["ingest/proxy/requests"] > 0, stats
    assert stats["retry/count"] >= 1, stats  # /status/500 and the 3 s page, retried once each
    db = Database(pg_url)
    assert db.count("ingest_items") == stats["item_scraped_count"] > 0
    assert db.count("ingest_requests") == stats["ingest/requests/stored"]
    [(status, reason)] = db.query("SELECT status, close_reason FROM ingest_jobs")
    assert (status, reason) == ("finished", "finished")
