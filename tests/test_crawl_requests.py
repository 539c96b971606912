"""End-to-end crawls of the request log and the log capture, into SQLite and PostgreSQL.

The tree crawl (``TreeSpider`` on the site's ``/tree``) meets links, a redirect, a 404, a 500
that is retried, a timeout and a port where nothing listens; each download attempt must be one
row with the right outcome, ``parent_id`` must form the crawl tree, and the spider's own
warnings and a callback's traceback must be in ``ingest_logs``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
from _helpers import REPO_DIR, Database, password_role, run_crawl
from conftest import service_missing
from services import TREE_COOKIE, ServiceUnavailable, free_port, running_tinyproxy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _helpers import CrawlResult, PasswordRole
    from services import LocalSite, Proxy

pytestmark = pytest.mark.crawl

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
TREE_PAGE = re.compile(r"/page/(\d+)\?total=4&fanout=2$")
COOKBOOK = REPO_DIR / "docs" / "cookbook.md"
CHROMIUM = "/usr/bin/chromium"
#: rows of a tree crawl: /tree, 4 pages, a redirect and its target, a 404, and 3 attempts each
#: of a 500, a timeout, a refused connection and a failed TLS handshake
TREE_ROWS = 1 + 4 + 2 + 1 + 4 * 3


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest) -> Database:
    fixture = "pg_url" if request.param == "postgres" else "sqlite_url"
    return Database(request.getfixturevalue(fixture))


def _tree_crawl(
    site: LocalSite, db: Database, tmp_path: Path, **args: Any
) -> tuple[CrawlResult, str]:
    refused = f"http://127.0.0.1:{free_port()}/nothing-listens"
    settings = {"INGEST_DATABASE_URL": db.url, **args.pop("settings", {})}
    result = run_crawl(
        {
            "base_url": site.base_url,
            "spider": "tree",
            "refused_url": refused,
            "tls_url": _tls_url(site),
            "settings": settings,
            **args,
        },
        tmp_path,
    )
    return result, refused


def _tls_url(site: LocalSite) -> str:
    """An https:// URL of the plain-HTTP test site: the TLS handshake fails."""
    return site.base_url.replace("http://", "https://") + "/tls"


def _tree_path(site: LocalSite, refused: str) -> str:
    return "/tree?" + urlencode({"refused": refused, "tls": _tls_url(site)})


def _by_path(requests: list[dict[str, Any]], base_url: str) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(requests, key=lambda r: (r["started_at"], r["retry_times"])):
        path = row["url"].removeprefix(base_url)
        rows.setdefault(path, []).append(row)
    return rows


@pytest.mark.exclusive
@pytest.mark.parametrize("reactor", ["asyncio", "default"])
def test_each_download_attempt_is_one_row_and_the_logs_are_stored(
    site: LocalSite, db: Database, tmp_path: Path, reactor: str
) -> None:
    result, refused = _tree_crawl(site, db, tmp_path, reactor=reactor)
    assert result.returncode == 0, result.describe()
    assert result.stats.get("finish_reason") == "finished", result.describe()
    [job] = db.rows("ingest_jobs")
    requests = db.rows("ingest_requests")
    tree_path = _check_requests(requests, job, site, refused)
    _check_logs(db.rows("ingest_logs"), job, result, site, tree_path, requests)


def _check_requests(
    requests: list[dict[str, Any]], job: dict[str, Any], site: LocalSite, refused: str
) -> str:
    for row in requests:
        assert row["job_id"] == job["job_id"]
        assert row["spider"] == "tree"
        assert row["method"] == "GET"
        assert re.fullmatch(r"[0-9a-f]{40}", row["fingerprint"]), row
        assert not row["playwright"]
        assert row["headers"] is None  # INGEST_REQUESTS_STORE_HEADERS is off
        assert row["latency_ms"] is not None and row["latency_ms"] >= 0
        assert job["started_at"] <= row["started_at"] <= job["finished_at"]
    rows = _by_path(requests, site.base_url)
    one = {path: attempts[0] for path, attempts in rows.items() if len(attempts) == 1}

    # the start request, the tree of pages, the redirect and its target
    tree_path = _tree_path(site, refused)
    tree = one[tree_path]
    assert (tree["status"], tree["parent_id"], tree["depth"]) == (200, None, 0)
    assert tree["response_bytes"] > 0
    pages = {int(m[1]): row for path, row in one.items() if (m := TREE_PAGE.search(path))}
    assert sorted(pages) == [0, 1, 2, 3]
    assert pages[0]["parent_id"] == tree["id"]
    assert pages[1]["parent_id"] == pages[2]["parent_id"] == pages[0]["id"]
    assert pages[3]["parent_id"] in {pages[1]["id"], pages[2]["id"]}  # whichever came first
    assert [pages[k]["depth"] for k in range(4)] == [1, 2, 2, 3]
    assert all(page["status"] == 200 and page["retry_times"] == 0 for page in pages.values())
    hop = one["/redirect?to=/page/9%3Ftotal%3D4"]
    assert (hop["status"], hop["parent_id"]) == (302, tree["id"])
    target = one["/page/9?total=4"]
    assert (target["status"], target["parent_id"]) == (200, hop["id"])

    # a 404 is one attempt; a 500, a timeout, a refused connection, a failed TLS handshake are
    # each retried twice
    assert (one["/status/404"]["status"], one["/status/404"]["error"]) == (404, None)
    for path, status, error in [
        ("/status/500", 500, None),
        ("/delay?ms=3000", None, "TimeoutError"),
        (refused, None, "ConnectionRefusedError"),
        (_tls_url(site), None, "SSL"),
    ]:
        attempts = rows[path.removeprefix(site.base_url)]
        assert [a["retry_times"] for a in attempts] == [0, 1, 2], path
        assert {a["parent_id"] for a in attempts} == {tree["id"]}, path
        assert {a["status"] for a in attempts} == {status}, path
        if error is None:
            assert {a["error"] for a in attempts} == {None}
        else:
            # the class name (TimeoutError; DownloadTimeoutError on Scrapy 2.14+), or for TLS
            # the cause: OpenSSL's error inside the wrapping ResponseNeverReceived
            assert all(error in a["error"] for a in attempts), attempts
            assert all(a["response_bytes"] is None for a in attempts)
    for attempt in rows["/delay?ms=3000"]:  # DOWNLOAD_TIMEOUT is 1 s
        assert 900 <= attempt["latency_ms"] < 2500, attempt
    assert len(requests) == TREE_ROWS
    assert job["requests_count"] == len(requests)
    return tree_path


def _check_logs(  # noqa: PLR0917
    logs: list[dict[str, Any]],
    job: dict[str, Any],
    result: CrawlResult,
    site: LocalSite,
    tree_path: str,
    requests: list[dict[str, Any]],
) -> None:
    """The spider's warnings, a callback's traceback, the counts of the job row."""
    one = _by_path(requests, site.base_url)
    assert {log["job_id"] for log in logs} == {job["job_id"]}
    warnings = [log for log in logs if log["logger"] == "tree"]
    prefix = f"tree page {site.base_url}"
    assert sorted(w["message"].removeprefix(prefix) for w in warnings) == sorted(
        [path for path in one if TREE_PAGE.search(path) and "/page/3?" not in path]
        + ["/page/9?total=4", tree_path]
    )
    assert {(w["level"], w["level_name"]) for w in warnings} == {(30, "WARNING")}
    [spider_error] = [log for log in logs if log["message"].startswith("Spider error processing")]
    assert (spider_error["level"], spider_error["logger"]) == (40, "scrapy.core.scraper")
    assert "Traceback (most recent call last)" in spider_error["exception"]
    assert "ValueError: boom on" in spider_error["exception"]
    assert "raise ValueError" in spider_error["exception"]  # source lines are there
    assert not any(log["logger"].startswith("scrapy_ingest") for log in logs)
    assert min(log["level"] for log in logs) == 20  # INGEST_LOG_LEVEL is INFO
    stored_counts: dict[str, int] = {}
    for log in logs:
        stored_counts[log["level_name"]] = stored_counts.get(log["level_name"], 0) + 1
    # counted from the crawl's first records on, scrapy_ingest's own (not stored) included
    assert set(job["log_counts"]) == set(stored_counts)
    assert all(job["log_counts"][level] >= stored_counts[level] for level in stored_counts)
    for level in ("WARNING", "ERROR"):  # nothing before the spider opens, nothing of ours
        assert job["log_counts"][level] == stored_counts[level]
        assert job["log_counts"][level] == result.stats[f"log_count/{level}"]
    assert job["errors_count"] == stored_counts["ERROR"] >= 4
    assert result.stats["ingest/requests/stored"] == len(requests)
    assert result.stats["ingest/logs/stored"] == len(logs)


def test_started_at_is_when_the_download_started_not_when_it_was_queued(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    db = Database(sqlite_url)
    # a download delay: each request waits in the downloader's queue 0.3 s after the previous
    settings = {
        "INGEST_DATABASE_URL": sqlite_url,
        "DOWNLOAD_DELAY": 0.3,
        "RANDOMIZE_DOWNLOAD_DELAY": False,
    }
    result = run_crawl(
        {"base_url": site.base_url, "settings": settings, "pages": 4, "per_page": 1}, tmp_path
    )
    result.assert_clean()
    rows = sorted(db.rows("ingest_requests"), key=lambda r: r["started_at"])
    assert len(rows) == 4
    for row in rows:
        assert row["latency_ms"] < 200, row  # the wait in the queue is not in it
    for before, after in itertools.pairwise(rows):
        gap = (after["started_at"] - before["started_at"]).total_seconds()
        assert gap >= 0.29, (before, after)


def test_two_crawlers_in_one_process_keep_their_logs_apart(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    db = Database(sqlite_url)
    twins = [{"INGEST_JOB_ID": "job-a"}, {"INGEST_JOB_ID": "job-b"}]
    result, _ = _tree_crawl(site, db, tmp_path, twins=True, twin_settings=twins)
    assert result.returncode == 0, result.describe()
    logs = db.rows("ingest_logs")
    for job_id, spider, other in [("job-a", "tree_a", "tree_b"), ("job-b", "tree_b", "tree_a")]:
        own = [log for log in logs if log["job_id"] == job_id]
        assert any(log["logger"] == spider for log in own)
        assert not any(log["logger"] == other for log in own), job_id
        assert {r["spider"] for r in db.rows("ingest_requests", "job_id = %s", (job_id,))} == {
            spider
        }
        [spider_error] = [log for log in own if log["message"].startswith("Spider error")]
        assert "ValueError: boom on" in spider_error["exception"]
    jobs = {job["job_id"]: job for job in db.rows("ingest_jobs")}
    for index, job_id in enumerate(["job-a", "job-b"]):
        stored = [log for log in logs if log["job_id"] == job_id and log["level"] >= 40]
        assert jobs[job_id]["errors_count"] == len(stored)
        assert jobs[job_id]["requests_count"] == result.all_stats[index]["ingest/requests/stored"]


def test_requests_and_logs_can_be_turned_off(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    db = Database(sqlite_url)
    settings = {"INGEST_REQUESTS_ENABLED": False, "INGEST_LOGS_ENABLED": False}
    result, _ = _tree_crawl(site, db, tmp_path, settings=settings)
    assert result.returncode == 0, result.describe()
    assert db.count("ingest_requests") == 0
    assert db.count("ingest_logs") == 0
    assert db.count("ingest_items") == 5
    [job] = db.rows("ingest_jobs")
    # without the components, the job row takes Scrapy's own counts
    assert job["requests_count"] == result.stats["downloader/request_count"]
    assert job["errors_count"] == result.stats["log_count/ERROR"]
    assert job["log_counts"]["WARNING"] == result.stats["log_count/WARNING"]


def test_headers_are_stored_with_secrets_redacted(
    site: LocalSite, db: Database, tmp_path: Path
) -> None:
    headers = {"Authorization": "Bearer planted-bearer"}
    settings = {"INGEST_REQUESTS_STORE_HEADERS": True}
    result, _ = _tree_crawl(site, db, tmp_path, settings=settings, headers=headers)
    assert result.returncode == 0, result.describe()
    requests = db.rows("ingest_requests")
    for row in requests:
        sent = row["headers"]["request"]
        assert sent["Authorization"] == ["***"]
        assert sent["User-Agent"][0].startswith("Scrapy/")
        if row["status"] is not None:
            assert row["headers"]["response"]["Content-Length"]
        else:
            assert "response" not in row["headers"]
    # the site's session cookie: set by the tree page, then sent to it with every request
    [tree] = [row for row in requests if "/tree?" in row["url"]]
    assert tree["headers"]["response"]["Set-Cookie"] == ["***"]
    followers = [row for row in requests if row["url"].startswith(site.base_url + "/page/")]
    assert {tuple(row["headers"]["request"]["Cookie"]) for row in followers} == {("***",)}
    assert "planted" not in repr(requests)
    assert TREE_COOKIE not in repr(requests)


# scrapy-playwright


def test_downloads_by_scrapy_playwright_are_marked(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    if importlib.util.find_spec("scrapy_playwright") is None:
        service_missing("scrapy-playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        service_missing(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    db = Database(sqlite_url)
    result = run_crawl(
        {
            "base_url": site.base_url,
            "spider": "playwright",
            "settings": {"INGEST_DATABASE_URL": sqlite_url},
        },
        tmp_path,
    )
    result.assert_clean()
    rows = {row["url"].removeprefix(site.base_url): row for row in db.rows("ingest_requests")}
    assert sorted(rows) == [f"/page/{k}?total=3&fanout=2" for k in range(3)]
    first = rows.pop("/page/0?total=3&fanout=2")
    assert first["playwright"]  # rendered by Chromium
    assert first["status"] == 200
    assert first["response_bytes"] > 0
    assert first["latency_ms"] > 0
    for row in rows.values():  # plain requests, through scrapy-playwright's fallback
        assert not row["playwright"]
        assert row["parent_id"] == first["id"]
        assert row["status"] == 200
    items = db.rows("ingest_items")
    assert sorted(item["data"]["title"] for item in items) == ["page 0", "page 1", "page 2"]


# credentials: never in a table, never in a log


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with contextlib.ExitStack() as stack:
        try:
            proxy = stack.enter_context(running_tinyproxy("proxyuser", "proxypw-planted-7d1"))
        except ServiceUnavailable as exc:
            reason = str(exc)
        else:
            yield proxy
            return
    service_missing(reason)


@pytest.fixture
def pg_role(pg_url: str) -> Iterator[PasswordRole]:
    yield from password_role(pg_url)


@pytest.mark.postgres
def test_a_planted_password_is_in_no_table_and_no_log(
    site: LocalSite, pg_role: PasswordRole, proxy: Proxy, tmp_path: Path
) -> None:
    db = Database(pg_role.url)
    bearer = "bearer-planted-2c9"
    settings = {
        "INGEST_REQUESTS_STORE_HEADERS": True,
        # every record Scrapy makes, stored and shown
        "INGEST_LOG_LEVEL": "DEBUG",
        "LOG_LEVEL": "DEBUG",
    }
    result, _ = _tree_crawl(
        site,
        db,
        tmp_path,
        settings=settings,
        headers={"Authorization": f"Bearer {bearer}"},
        proxy=proxy.url,
    )
    assert result.returncode == 0, result.describe()
    requests = db.rows("ingest_requests")
    # the proxy was used, with its credentials (else: 407 Proxy Authentication Required)
    assert {row["proxy"] for row in requests} == {f"http://127.0.0.1:{proxy.port}"}
    assert 407 not in {row["status"] for row in requests}
    assert "/page/0?total=4" in proxy.log()
    assert db.count("ingest_logs", "level = 10") > 0  # DEBUG records were stored
    secrets = [pg_role.password, proxy.password, bearer, TREE_COOKIE]
    tables = [
        name
        for (name,) in db.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    ]
    assert {"ingest_requests", "ingest_logs", "ingest_jobs", "ingest_items"} <= set(tables)
    for table in tables:
        for (text,) in db.query(f"SELECT row_to_json(t)::text FROM {table} AS t"):
            for secret in secrets:
                assert secret not in text, (table, text)
    for secret in secrets:
        assert secret not in result.output


# the SQL cookbook: every query in docs/cookbook.md runs on what a crawl stored


def cookbook_queries(dialect: str) -> list[str]:
    """The ``sql`` blocks of the cookbook pages that start ``-- PostgreSQL`` (or ``-- SQLite``,
    ``-- ClickHouse``, ``-- MySQL``)."""
    pages = [COOKBOOK, COOKBOOK.with_name("cookbook-clickhouse-mysql.md")]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    blocks = re.findall(r"```sql\n(.*?)```", text, re.DOTALL)
    marker = {
        "postgres": "-- PostgreSQL",
        "sqlite": "-- SQLite",
        "clickhouse": "-- ClickHouse",
        "mysql": "-- MySQL",
    }[dialect]
    return [block for block in blocks if block.startswith(marker)]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "clickhouse",
        "mysql",
    ]
)
def any_db(request: pytest.FixtureRequest) -> Database:
    fixture = {
        "sqlite": "sqlite_url",
        "postgres": "pg_url",
        "clickhouse": "chdb_url",
        "mysql": "mysql_url",
    }[request.param]
    return Database(request.getfixturevalue(fixture))


def test_every_cookbook_query_runs(site: LocalSite, any_db: Database, tmp_path: Path) -> None:
    db = any_db
    result, refused = _tree_crawl(site, db, tmp_path)
    assert result.returncode == 0, result.describe()
    [job] = db.rows("ingest_jobs")
    queries = cookbook_queries(db.kind)
    assert len(queries) >= (25 if db.kind in ("postgres", "sqlite") else 9)
    # the cookbook's example job id and spider stand for this crawl's
    sqls = [
        query.replace("01a2084d-e902-77dc-ac3d-2e842c3c054a", job["job_id"]).replace(
            "'books'", "'tree'"
        )
        for query in queries
    ]
    if db.kind == "clickhouse":  # one process for them all (chDB starts in about a second)
        answers = dict(zip(queries, [[rows] for rows in db.script(";\n".join(sqls))], strict=True))
    else:
        answers = {query: db.script(sql) for query, sql in zip(queries, sqls, strict=True)}
    # some answers are known: the crawl tree reaches every attempt of the crawl
    [tree] = [rows for query, rows in answers.items() if "crawl_tree" in query]
    assert len(tree[0]) == db.count("ingest_requests") == TREE_ROWS
    assert [row[0] for row in tree[0]].count(0) == 1  # one start request
    # and this job, which logged errors, is the last failed one
    [failed] = [rows for query, rows in answers.items() if "errors_count > 0" in query]
    assert any(row[3].startswith("Spider error processing") for row in failed[0]), failed
    [per_host] = [rows for q, rows in answers.items() if "failed_percent" in q]
    by_host = {host: (attempts, failed) for host, attempts, failed, _ in per_host[0]}
    # 404, 500s, timeouts, TLS failures (the https:// URL is on the same host and port)
    assert by_host[site.base_url.removeprefix("http://")] == (TREE_ROWS - 3, 1 + 3 * 3)
    assert by_host[refused.split("/")[2]] == (3, 3)


# schema version 1 (before requests and logs) is migrated in place


def _downgrade_to_version_1(db: Database) -> None:
    db.script(
        """
        DROP TABLE ingest_requests;
        DROP TABLE ingest_logs;
        ALTER TABLE ingest_jobs DROP COLUMN requests_count;
        ALTER TABLE ingest_jobs DROP COLUMN errors_count;
        ALTER TABLE ingest_jobs DROP COLUMN log_counts;
        ALTER TABLE ingest_jobs DROP COLUMN quality;
        DROP INDEX ingest_items_item_type_item_key_idx;
        ALTER TABLE ingest_items DROP COLUMN item_key;
        ALTER TABLE ingest_items DROP COLUMN content_hash;
        ALTER TABLE ingest_items DROP COLUMN version;
        ALTER TABLE ingest_items DROP COLUMN first_seen_at;
        ALTER TABLE ingest_items DROP COLUMN last_seen_at;
        ALTER TABLE ingest_items DROP COLUMN errors;
        DELETE FROM ingest_schema_version;
        INSERT INTO ingest_schema_version (version, applied_at)
            VALUES (1, '2026-01-01 00:00:00+00:00');
        """
    )


def test_tables_of_schema_version_1_are_migrated(
    site: LocalSite, db: Database, tmp_path: Path
) -> None:
    first = run_crawl(
        {"base_url": site.base_url, "settings": {"INGEST_DATABASE_URL": db.url}, "pages": 1},
        tmp_path,
    )
    first.assert_clean()
    _downgrade_to_version_1(db)
    [old_job] = db.rows("ingest_jobs")
    assert "requests_count" not in old_job

    # a crawl that may not change the tables says what to do
    refused, _ = _tree_crawl(site, db, tmp_path, settings={"INGEST_CREATE_TABLES": False})
    # Scrapy 2.13 ends such a crawl with exit code 0 and no finish reason
    assert refused.returncode != 0 or refused.stats.get("finish_reason") != "finished"
    assert "schema version 1, older than this scrapy-ingestion's (3)" in refused.output
    assert "INGEST_CREATE_TABLES = True" in refused.output
    assert not db.table_exists("ingest_requests")

    result, _ = _tree_crawl(site, db, tmp_path)
    assert result.returncode == 0, result.describe()
    assert "Migrated the tables" in result.output
    assert sorted(v for (v,) in db.query("SELECT version FROM ingest_schema_version")) == [1, 3]
    assert {"item_key", "errors"} <= set(db.rows("ingest_items")[0])
    jobs = {job["job_id"]: job for job in db.rows("ingest_jobs")}
    assert jobs.pop(old_job["job_id"])["requests_count"] is None  # the old row is kept as it was
    [new_job] = jobs.values()
    assert new_job["requests_count"] == db.count("ingest_requests") == TREE_ROWS
    assert db.count("ingest_logs") > 0
    assert db.count("ingest_items") == 10 + 5
