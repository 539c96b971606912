"""The Spidermon monitor suite (scrapy_ingest.monitors) on real crawls: a healthy crawl passes
every monitor; dead letters, validation failures, a database down until the close, and
monitors run before scrapy_ingest has closed each fail the right one, and the suite's
``monitors_failed_actions`` action is called (tests/_monitor_suites.py records it)."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest
import services
from _helpers import Crawl, CrawlResult, Database, run_crawl, wait_for
from conftest import service_missing

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from services import LocalSite

pytestmark = pytest.mark.crawl

MONITORS = {
    "NothingLostMonitor",
    "SpillReplayedMonitor",
    "DeadLettersMonitor",
    "ValidationFailuresMonitor",
    "JobRowClosedMonitor",
}


def monitored(
    site: LocalSite, url: str, tmp_path: Path, extension: str = "scrapy_ingest.monitors.Spidermon"
) -> dict[str, Any]:
    return {
        "base_url": site.base_url,
        "pages": 2,
        "per_page": 10,
        "settings": {
            "INGEST_DATABASE_URL": url,
            "INGEST_SPILL_DIR": str(tmp_path / "spill"),
            "EXTENSIONS": {extension: 500},
            "SPIDERMON_ENABLED": True,
            "SPIDERMON_SPIDER_CLOSE_MONITORS": ["_monitor_suites.RecordingSuite"],
            "TEST_MONITOR_RECORD": str(tmp_path / "monitors.jsonl"),
        },
    }


def records(tmp_path: Path) -> dict[str, Any]:
    """What the suite's actions recorded: ``results`` (monitor -> status and error) and
    ``failed`` (the failed action's list, None if it was not called)."""
    path = tmp_path / "monitors.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    [results] = [line["results"] for line in lines if line["action"] == "results"]
    failed = [line["failed"] for line in lines if line["action"] == "failed"]
    assert len(failed) <= 1, failed
    assert set(results) == MONITORS, results
    return {"results": results, "failed": failed[0] if failed else None}


def assert_only_failed(tmp_path: Path, result: CrawlResult, *failing: str) -> dict[str, str]:
    """The monitors in *failing* failed, the others passed, and the failed action was called
    with them; return the failures' messages."""
    got = records(tmp_path)
    statuses = {name: r["status"] for name, r in got["results"].items()}
    expected = {name: "FAIL" if name in failing else "OK" for name in MONITORS}
    assert statuses == expected, (got, result.describe())
    assert got["failed"] == (sorted(failing) if failing else None), got
    return {name: message(got["results"][name]["error"]) for name in failing}


def message(error: str) -> str:
    """The exception's message in the traceback Spidermon records for a monitor."""
    found = re.search(r"^[\w.]+: (.*)", error, re.MULTILINE | re.DOTALL)
    assert found is not None, error
    return found.group(1).strip()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_healthy_crawl_passes_every_monitor(
    request: pytest.FixtureRequest, site: LocalSite, tmp_path: Path, backend: str
) -> None:
    url = request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url")
    result = run_crawl(monitored(site, url, tmp_path), tmp_path)
    result.assert_clean()
    assert result.stats["ingest/items/stored"] == 20
    assert result.stats["ingest/jobs/closed"] == 1
    got = records(tmp_path)
    assert {r["status"] for r in got["results"].values()} == {"OK"}, got
    assert got["failed"] is None  # the failed action was not called


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_dead_letters_fail_the_dead_letter_monitor_and_call_the_action(
    request: pytest.FixtureRequest, site: LocalSite, tmp_path: Path, backend: str
) -> None:
    url = request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url")
    args = monitored(site, url, tmp_path)
    args["kind"] = "str"  # not items: each goes to the dead-letter table
    result = run_crawl(args, tmp_path)
    assert result.returncode == 0, result.describe()
    assert result.stats["ingest/items/dead_letter"] == 20
    [message] = assert_only_failed(tmp_path, result, "DeadLettersMonitor").values()
    assert message.startswith("20 records went to the dead-letter table"), message
    assert "(items 20), more than SPIDERMON_INGEST_MAX_DEAD_LETTERS (0)" in message
    assert "FROM ingest_dead_letters WHERE job_id = '" in message
    # the SQL the message gives works, and finds them
    sql = message.split("Their reasons: ")[1].split(". Fix")[0]
    [(kind, reason, count)] = Database(url).query(sql)
    assert (kind, count) == ("items", 20) and "not an item but a str" in reason


def test_dead_letters_within_the_setting_pass(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    args = monitored(site, sqlite_url, tmp_path)
    args["kind"] = "str"
    args["settings"]["SPIDERMON_INGEST_MAX_DEAD_LETTERS"] = 20
    result = run_crawl(args, tmp_path)
    assert result.returncode == 0, result.describe()
    assert_only_failed(tmp_path, result)


def test_validation_failures_fail_the_validation_monitor(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    args = monitored(site, sqlite_url, tmp_path)
    args.update(spider="catalog", catalog_size=10)
    # CheapProduct refuses every product dearer than 14 (warn: stored with their errors)
    args["settings"].update(
        INGEST_ITEM_SCHEMAS={"CatalogProduct": "_schemas.CheapProduct"},
        SPIDERMON_INGEST_MAX_VALIDATION_FAILURES="1",  # a setting from the command line: text
    )
    result = run_crawl(args, tmp_path)
    assert result.returncode == 0, result.describe()
    invalid = result.stats["ingest/quality/CatalogProduct/invalid"]
    assert invalid > 1
    [message] = assert_only_failed(tmp_path, result, "ValidationFailuresMonitor").values()
    assert message.startswith(
        f"{invalid} items failed validation against INGEST_ITEM_SCHEMAS "
        f"(CatalogProduct {invalid}), more than SPIDERMON_INGEST_MAX_VALIDATION_FAILURES (1)"
    ), message
    assert "stored with their errors" in message


def test_an_invalid_limit_fails_with_the_setting_and_the_fix(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    args = monitored(site, sqlite_url, tmp_path)
    args["kind"] = "str"
    args["settings"]["SPIDERMON_INGEST_MAX_DEAD_LETTERS"] = "-3"
    result = run_crawl(args, tmp_path)
    got = records(tmp_path)
    assert got["results"]["DeadLettersMonitor"]["status"] == "ERROR", got
    assert got["failed"] == ["DeadLettersMonitor"]
    assert message(got["results"]["DeadLettersMonitor"]["error"]).startswith(
        "SPIDERMON_INGEST_MAX_DEAD_LETTERS ('-3') is invalid: it must be a whole number, 0 or more"
    ), result.describe()


@pytest.fixture
def server() -> Iterator[tuple[services.LocalPostgres, str]]:
    """A PostgreSQL of this test's own, which it may stop; and a database URL."""
    with ExitStack() as stack:
        try:
            yield services.own_postgres(stack)
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))


@pytest.mark.postgres
def test_a_database_down_until_the_close_fails_the_spill_monitor(
    site: LocalSite, server: tuple[services.LocalPostgres, str], tmp_path: Path
) -> None:
    local, url = server
    args = monitored(site, url, tmp_path)
    args.update(pages=200, per_page=20, delay_ms=100)  # about 5 s of pages, 4 at a time
    args["settings"].update(
        CONCURRENT_REQUESTS=4, INGEST_RETRY_TIMEOUT=1, INGEST_FLUSH_INTERVAL=0.2
    )
    crawl = Crawl(args, tmp_path)
    try:

        def first_items() -> bool:
            assert crawl.running, "the crawl ended before the database was stopped"
            db = Database(url)
            return (
                db.table_exists("ingest_items")
                and db.query("SELECT count(*) FROM ingest_items")[0][0]
            )

        wait_for(first_items, timeout=120, what="the first items stored")
        local.pause()  # and down until the crawl has closed
        result = crawl.wait()
    finally:
        crawl.kill()
    assert result.returncode == 0, result.describe()  # nothing lost: it waits in the journal
    stats = result.stats
    assert stats["ingest/spill/batches"] >= 1, result.describe()
    assert stats.get("ingest/spill/replayed_batches", 0) == 0
    assert "ingest/items/lost" not in stats
    [message] = assert_only_failed(tmp_path, result, "SpillReplayedMonitor").values()
    batches = stats["ingest/spill/batches"]
    assert message.startswith(f"{batches} of the {batches} batches this crawl spilled"), message
    assert f"items {stats['ingest/items/spilled']}" in message, message
    assert "close reason 'finished'" in message
    assert f"the spill journal under {tmp_path / 'spill'}" in message
    assert "run `scrapy ingest replay`" in message


def test_with_spidermons_own_extension_the_job_row_monitor_says_to_use_ours(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    """Spidermon's extension runs spider-close suites while scrapy_ingest still closes: the
    job row is not closed yet when they run."""
    args = monitored(site, sqlite_url, tmp_path, "spidermon.contrib.scrapy.extensions.Spidermon")
    result = run_crawl(args, tmp_path)
    assert result.returncode == 0, result.describe()
    assert result.stats["ingest/jobs/closed"] == 1  # closed, but after the monitors ran
    got = records(tmp_path)
    failure = got["results"]["JobRowClosedMonitor"]
    assert failure["status"] == "FAIL", got
    assert "use scrapy_ingest.monitors.Spidermon in place of" in message(failure["error"])


def test_without_spidermon_the_import_names_the_extra(tmp_path: Path) -> None:
    import subprocess
    import sys

    from _helpers import REPO_DIR

    blocker = tmp_path / "spidermon"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('No module named spidermon')\n")
    code = "import scrapy_ingest.monitors"
    answer = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": f"{tmp_path}:{REPO_DIR}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert answer.returncode == 1
    assert 'pip install "scrapy-ingestion[spidermon]"' in answer.stderr, answer.stderr


def test_lost_rows_fail_the_nothing_lost_monitor() -> None:
    """Rows lost (a full journal disk: tests/test_spill_disk_full.py makes them for real) as
    the stats count them, through Spidermon's own runner."""
    from scrapy.utils.test import get_crawler
    from spidermon import MonitorRunner, MonitorSuite

    from scrapy_ingest.monitors import NothingLostMonitor

    stats = {"ingest/items/lost": 3, "ingest/logs/lost": "1", "ingest/items/stored": 9}
    runner = MonitorRunner()
    result = runner.run(
        MonitorSuite(monitors=[NothingLostMonitor]), stats=stats, crawler=get_crawler()
    )
    [failure] = result.monitors_failed_results
    assert message(failure.error).startswith(
        "4 rows were lost (items 3, logs 1): neither the database nor the spill journal took them"
    ), failure.error
    clean = runner.run(
        MonitorSuite(monitors=[NothingLostMonitor]),
        stats={"ingest/items/lost": 0, "ingest/items/stored": 9},
        crawler=get_crawler(),
    )
    assert not clean.monitors_failed_results and len(clean.monitors_passed_results) == 1
