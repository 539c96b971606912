"""End-to-end crawls against the local test site, on both reactors, into SQLite and PostgreSQL:
every item stored once and queryable, the job row, awkward values, job ids, backpressure, the
heartbeat and flushing by age. Each crawl runs in a subprocess (``_crawl_script.py``)."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from _crawl_script import AWKWARD, ITEM_KINDS, Refused, awkward_index, title
from _helpers import REACTORS, REPO_DIR, Crawl, Database, password_role, run_crawl

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from _helpers import CrawlResult, PasswordRole
    from services import LocalSite

pytestmark = pytest.mark.crawl

SPIDER = "ingest_test"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest) -> Database:
    """The database of one test, on each backend in turn."""
    fixture = "pg_url" if request.param == "postgres" else "sqlite_url"
    return Database(request.getfixturevalue(fixture))


def _database(request: pytest.FixtureRequest, backend: str) -> Database:
    return Database(request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url"))


def _crawl(
    site: LocalSite,
    db: Database,
    tmp_path: Path,
    *,
    settings: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **args: Any,
) -> CrawlResult:
    return run_crawl(
        {
            "base_url": site.base_url,
            "settings": {"INGEST_DATABASE_URL": db.url, **(settings or {})},
            **args,
        },
        tmp_path,
        env,
    )


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}"))


def _json_path(db: Database, field: str) -> str:
    """SQL reading top-level *field* of ``data`` as text."""
    if db.kind == "postgres":
        return f"data->>'{field}'"
    return f"json_extract(data, '$.{field}')"


# every item, once, queryable


STORE_CASES = [
    # every reactor on every backend, every item type on every backend
    ("asyncio", "sqlite", "dict"),
    ("default", "sqlite", "scrapy.Item"),
    ("asyncio", "sqlite", "dataclass"),
    ("default", "sqlite", "attrs"),
    pytest.param("default", "postgres", "dict", marks=pytest.mark.postgres),
    pytest.param("asyncio", "postgres", "scrapy.Item", marks=pytest.mark.postgres),
    pytest.param("default", "postgres", "dataclass", marks=pytest.mark.postgres),
    pytest.param("asyncio", "postgres", "attrs", marks=pytest.mark.postgres),
]


@pytest.mark.parametrize(("reactor", "backend", "kind"), STORE_CASES)
def test_every_item_is_stored_once(  # noqa: PLR0917 - fixtures and parameters
    request: pytest.FixtureRequest,
    site: LocalSite,
    tmp_path: Path,
    reactor: str,
    backend: str,
    kind: str,
) -> None:
    db = _database(request, backend)
    pages, per_page = 3, 20
    total = pages * per_page
    result = _crawl(site, db, tmp_path, reactor=reactor, kind=kind, pages=pages, per_page=per_page)
    result.assert_clean()
    assert result.reactor == REACTORS[reactor]
    assert result.stats["item_scraped_count"] == total

    [job] = db.jobs()
    items = db.items()
    assert len(items) == total
    ids = [item["id"] for item in items]
    assert len(set(ids)) == total
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert sorted(item["data"]["title"] for item in items) == [title(i) for i in range(total)]
    for item in items:
        data = item["data"]
        assert item["url"] == data["page_url"]  # the URL of the response the item came from
        assert item["url"] == site.url(f"/items?n={per_page}&page={data['idx'] // per_page}")
        assert item["item_type"] == ITEM_KINDS[kind]
        assert item["spider"] == SPIDER
        assert item["job_id"] == job["job_id"]
        assert data["price"] == data["idx"] + 0.5
        scraped_at = item["scraped_at"]
        assert scraped_at.utcoffset() == dt.timedelta(0)
        assert job["started_at"] <= scraped_at <= job["finished_at"]

    # data is queryable with the database's own JSON operators
    title_sql = _json_path(db, "title")
    idx_sql = "(data->>'idx')::int" if db.kind == "postgres" else _json_path(db, "idx")
    rows = db.query(f"SELECT {title_sql} FROM ingest_items WHERE {idx_sql} = %s", (7,))
    assert rows == [("item-00007",)]
    rows = db.query(f"SELECT count(*) FROM ingest_items WHERE {title_sql} LIKE %s", ("item-0001%",))
    assert rows == [(10,)]

    assert job["status"] == "finished"
    assert job["close_reason"] == "finished"
    assert job["spider"] == SPIDER
    assert job["items_count"] == total
    assert job["crawl_id"] == job["job_id"]  # no INGEST_CRAWL_ID: the job is its own crawl
    assert job["hostname"] == socket.gethostname()
    assert isinstance(job["pid"], int) and job["pid"] > 0
    for name in ("started_at", "updated_at", "finished_at"):
        assert job[name].utcoffset() == dt.timedelta(0), name
    assert job["started_at"] <= job["updated_at"] <= job["finished_at"]
    assert job["finished_at"] == job["updated_at"]
    assert job["stats"]["item_scraped_count"] == total
    assert job["stats"]["ingest/items/queued"] == total
    assert job["stats"]["ingest/items/stored"] == total
    assert job["settings"]["INGEST_DATABASE_URL"] == _without_password(db.url)
    assert result.stats["ingest/items/stored"] == total


TABLES = (
    "ingest_items",
    "ingest_jobs",
    "ingest_requests",
    "ingest_logs",
    "ingest_dead_letters",
    "ingest_schema_version",
)
INDEXES = {
    "ingest_items_job_id_idx",
    "ingest_items_spider_scraped_at_idx",
    "ingest_items_item_type_idx",
    "ingest_jobs_crawl_id_idx",
    "ingest_jobs_spider_started_at_idx",
    "ingest_jobs_status_idx",
    "ingest_dead_letters_job_id_idx",
    "ingest_requests_job_id_started_at_idx",
    "ingest_requests_parent_id_idx",
    "ingest_requests_status_idx",
    "ingest_logs_job_id_logged_at_idx",
    "ingest_logs_level_idx",
}


def test_tables_and_indexes_as_documented(site: LocalSite, db: Database, tmp_path: Path) -> None:
    _crawl(site, db, tmp_path, pages=1, per_page=1).assert_clean()
    for table in TABLES:
        assert db.table_exists(table), table
    if db.kind == "sqlite":
        indexes = {
            row[0] for row in db.query("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert indexes >= INDEXES
        return
    indexes = {row[0] for row in db.query("SELECT indexname FROM pg_indexes")}
    assert indexes >= INDEXES
    types = dict(
        db.query(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
            " WHERE starts_with(table_name, 'ingest_')"
        )
    )
    assert types["ingest_items.data"] == "jsonb"
    assert types["ingest_items.id"] == "uuid"
    assert types["ingest_items.scraped_at"] == "timestamp with time zone"
    assert types["ingest_jobs.stats"] == "jsonb"
    assert types["ingest_jobs.settings"] == "jsonb"
    assert types["ingest_jobs.started_at"] == "timestamp with time zone"
    assert types["ingest_jobs.items_count"] == "bigint"
    assert types["ingest_dead_letters.id"] == "uuid"
    assert types["ingest_dead_letters.created_at"] == "timestamp with time zone"
    assert types["ingest_requests.latency_ms"] == "double precision"
    assert types["ingest_requests.parent_id"] == "uuid"
    assert types["ingest_requests.playwright"] == "boolean"
    assert types["ingest_logs.logged_at"] == "timestamp with time zone"
    assert types["ingest_jobs.log_counts"] == "jsonb"


def test_the_documented_ddl_is_all_a_crawl_needs(
    site: LocalSite, db: Database, tmp_path: Path
) -> None:
    # docs/tables.md, "Creating the tables yourself": its PostgreSQL block, then its SQLite one
    text = (REPO_DIR / "docs" / "tables.md").read_text(encoding="utf-8")
    section = text.split("## Creating the tables yourself", 1)[1]
    postgres_ddl, sqlite_ddl = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)[:2]
    db.script(postgres_ddl if db.kind == "postgres" else sqlite_ddl)
    result = _crawl(
        site, db, tmp_path, pages=1, per_page=3, settings={"INGEST_CREATE_TABLES": False}
    )
    result.assert_clean()
    assert db.count("ingest_items") == 3
    assert db.count("ingest_requests") == 1
    assert db.count("ingest_logs") > 0


def test_pipeline_alone_without_the_addon(site: LocalSite, sqlite_url: str, tmp_path: Path) -> None:
    # "every component also works alone": no add-on, no spider middleware, no extension
    db = Database(sqlite_url)
    result = _crawl(
        site,
        db,
        tmp_path,
        pages=2,
        per_page=5,
        settings={"ADDONS": {}, "ITEM_PIPELINES": {"scrapy_ingest.IngestPipeline": 900}},
    )
    result.assert_clean()
    items = db.items()
    assert sorted(i["data"]["idx"] for i in items) == list(range(10))
    assert {i["url"] for i in items} == {None}  # without SourceMiddleware, no URL
    [job] = db.jobs()
    assert (job["status"], job["close_reason"], job["items_count"]) == ("finished", "finished", 10)


# credentials


@pytest.fixture
def pg_role(pg_url: str) -> Iterator[PasswordRole]:
    yield from password_role(pg_url)


@pytest.mark.postgres
@pytest.mark.parametrize("password_in", ["userinfo", "query"])
def test_database_password_is_never_stored_or_logged(
    site: LocalSite, pg_role: PasswordRole, tmp_path: Path, password_in: str
) -> None:
    url = pg_role.url
    if password_in == "query":  # libpq reads ?password= too
        url = url.replace(f":{pg_role.password}@", "@") + f"?password={pg_role.password}"
    db = Database(url)
    result = _crawl(site, db, tmp_path, reactor="default", pages=1, per_page=5)
    result.assert_clean()
    assert db.count("ingest_items") == 5
    [job] = db.jobs()
    assert pg_role.password not in json.dumps(job["settings"])
    assert pg_role.password not in json.dumps(job["stats"])
    assert pg_role.password not in result.output
    stored_url = job["settings"]["INGEST_DATABASE_URL"]
    assert stored_url.startswith(f"postgresql://{pg_role.name}")
    assert "***" in stored_url


def test_secret_settings_are_redacted_in_the_job_row(
    site: LocalSite, db: Database, tmp_path: Path
) -> None:
    settings = {
        "MY_API_KEY": "topsecret-key",
        "BACKUP_URL": "https://backup:topsecret-backup@example.com/store",
        "DEFAULT_REQUEST_HEADERS": {
            "Authorization": "Bearer topsecret-bearer",
            "Cookie": "session=topsecret-cookie",
            "Accept": "text/html",
        },
    }
    result = _crawl(site, db, tmp_path, pages=1, per_page=2, settings=settings)
    result.assert_clean()
    [job] = db.jobs()
    stored = job["settings"]
    assert "topsecret" not in json.dumps(stored)
    assert stored["MY_API_KEY"] == "***"
    assert stored["BACKUP_URL"] == "https://backup:***@example.com/store"
    assert stored["DEFAULT_REQUEST_HEADERS"]["Accept"] == "text/html"
    assert stored["CONCURRENT_REQUESTS"] == 8  # settings the project changed are there
    assert stored["INGEST_BATCH_ROWS"] == 2000  # and every INGEST_* setting
    assert "topsecret" not in result.output


# the acceptance test of the issue: 2,000 items, 40 of them awkward


def _expected_values() -> tuple[dict[int, Any], dict[int, str]]:
    """idx -> stored form of its extra value; idx -> what the reason of a refused one says."""
    stored: dict[int, Any] = {}
    refused: dict[int, str] = {}
    for idx in range(2000):
        k = awkward_index(idx)
        if k is None:
            continue
        expected = AWKWARD[k][2]
        if isinstance(expected, Refused):
            refused[idx] = expected.reason
        else:
            stored[idx] = expected
    return stored, refused


@pytest.mark.slow
@pytest.mark.parametrize("reactor", ["asyncio", "default"])
def test_awkward_values_cost_no_other_item(
    site: LocalSite, db: Database, tmp_path: Path, reactor: str
) -> None:
    stored_forms, refused = _expected_values()
    assert len(stored_forms) + len(refused) == 40
    result = _crawl(site, db, tmp_path, reactor=reactor, pages=20, per_page=100, awkward=True)
    assert result.returncode == 0, result.describe()
    result.assert_clean()

    items = db.items()
    dead = db.dead_letters("items")
    assert len(items) + len(dead) == 2000
    by_idx = {item["data"]["idx"]: item for item in items}
    assert len(by_idx) == len(items)  # stored once each

    # every good item, and every awkward one that has a stored form, in the documented form
    good = set(range(2000)) - set(refused)
    assert set(by_idx) == good
    for idx in good:
        data = by_idx[idx]["data"]
        assert data["title"] == title(idx)
        assert by_idx[idx]["url"] == data["page_url"]
        if idx in stored_forms:
            assert data["extra"] == stored_forms[idx], AWKWARD[awkward_index(idx)][0]  # type: ignore[index]
        else:
            assert "extra" not in data

    # every refused one in the dead-letter table, with a reason naming the type
    assert len(dead) == len(refused)
    for idx, reason_part in refused.items():
        [letter] = [d for d in dead if title(idx) in (d["payload"] or "")]
        assert reason_part in letter["reason"], letter["reason"]

    [job] = db.jobs()
    assert job["status"] == "finished"
    assert job["close_reason"] == "finished"
    assert job["items_count"] == len(good)
    assert {d["job_id"] for d in dead} == {job["job_id"]}

    stats = result.stats
    assert stats["item_scraped_count"] == 2000
    assert stats["ingest/items/stored"] == len(good)
    assert stats["ingest/items/queued"] == len(good)  # items that cannot be encoded are not
    assert stats["ingest/items/dead_letter"] == len(refused)
    assert "ingest/items/lost" not in stats
    # each conversion counted once (see AWKWARD in _crawl_script.py)
    values = {k.rsplit("/", 1)[1]: v for k, v in stats.items() if k.startswith("ingest/values/")}
    assert values == {
        "datetime": 4,
        "date": 2,
        "timedelta": 1,
        "decimal": 6,
        "bytes": 2,
        "set": 3,
        "nul": 3,
        "surrogate": 2,
        "big_int": 3,
    }


# job ids


def test_fixed_job_id_cannot_be_used_twice(site: LocalSite, db: Database, tmp_path: Path) -> None:
    settings = {"INGEST_JOB_ID": "nightly-2024-05-01"}
    first = _crawl(site, db, tmp_path / "first", pages=1, per_page=5, settings=settings)
    first.assert_clean()
    [job] = db.jobs()
    assert job["job_id"] == "nightly-2024-05-01"
    before = db.raw_jobs()
    assert db.count("ingest_items") == 5

    second = _crawl(site, db, tmp_path / "second", pages=1, per_page=5, settings=settings)
    refused = second.returncode != 0 or second.stats.get("finish_reason") != "finished"
    assert refused, second.describe()
    assert "nightly-2024-05-01" in second.output
    assert "INGEST_JOB_ID" in second.output
    assert db.raw_jobs() == before  # the first job's row is untouched
    assert db.count("ingest_items") == 5  # and nothing was stored under its id
    # a clear error: the refusal, not a follow-up failure of our own components
    assert "AttributeError" not in second.output, second.describe()


@pytest.mark.parametrize("source", ["SCRAPY_JOB", "_job"])
def test_scrapyd_job_id(site: LocalSite, sqlite_url: str, tmp_path: Path, source: str) -> None:
    db = Database(sqlite_url)
    if source == "SCRAPY_JOB":
        result = _crawl(site, db, tmp_path, pages=1, per_page=3, env={"SCRAPY_JOB": "abc"})
    else:
        result = _crawl(site, db, tmp_path, pages=1, per_page=3, spider_args={"_job": "abc"})
    result.assert_clean()
    [job] = db.jobs()
    assert job["job_id"] == "abc"
    assert job["crawl_id"] == "abc"
    assert {item["job_id"] for item in db.items()} == {"abc"}


def test_job_id_setting_wins_over_scrapyd(site: LocalSite, sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    result = _crawl(
        site,
        db,
        tmp_path,
        pages=1,
        per_page=1,
        settings={"INGEST_JOB_ID": "mine"},
        env={"SCRAPY_JOB": "abc"},
    )
    result.assert_clean()
    assert [job["job_id"] for job in db.jobs()] == ["mine"]


def test_crawl_id_is_stored(site: LocalSite, db: Database, tmp_path: Path) -> None:
    settings = {"INGEST_CRAWL_ID": "catalog-2024-05"}
    for run in ("one", "two"):
        _crawl(site, db, tmp_path / run, pages=1, per_page=2, settings=settings).assert_clean()
    jobs = db.jobs()
    assert len(jobs) == 2
    assert {job["crawl_id"] for job in jobs} == {"catalog-2024-05"}
    assert len({job["job_id"] for job in jobs}) == 2  # fresh job ids, one per crawl
    assert db.count("ingest_items") == 4


# backpressure, heartbeat, flush by age


def test_backpressure_stores_every_item(site: LocalSite, db: Database, tmp_path: Path) -> None:
    settings = {
        "INGEST_MAX_BUFFER_BYTES": 64 * 1024,
        "INGEST_BATCH_BYTES": 16 * 1024,
        "INGEST_BATCH_ROWS": 50,
    }
    result = _crawl(site, db, tmp_path, pages=10, per_page=50, size=1024, settings=settings)
    result.assert_clean()
    assert result.stats.get("ingest/buffer/waits", 0) > 0, result.stats
    items = db.items()
    assert len(items) == 500
    assert sorted(item["data"]["idx"] for item in items) == list(range(500))
    assert db.jobs()[0]["items_count"] == 500


SLOW_CRAWL = {"pages": 8, "per_page": 3, "delay_ms": 300}
SLOW_SETTINGS = {"CONCURRENT_REQUESTS": 1}


def test_heartbeat_refreshes_the_running_job(site: LocalSite, db: Database, tmp_path: Path) -> None:
    crawl = Crawl(
        {
            "base_url": site.base_url,
            "settings": {
                "INGEST_DATABASE_URL": db.url,
                "INGEST_JOB_HEARTBEAT": 0.2,
                **SLOW_SETTINGS,
            },
            # 12 pages of 300 ms, one at a time: the job row is running for over 3.6 s
            **{**SLOW_CRAWL, "pages": 12},
        },
        tmp_path,
    )
    seen: list[dict[str, Any]] = []
    polls: list[tuple[float, str]] = []  # when, and what each poll saw (for the message)
    started = time.monotonic()
    try:
        while crawl.running:
            rows = db.jobs() if db.table_exists("ingest_jobs") else []
            polls.append((time.monotonic() - started, ",".join(job["status"] for job in rows)))
            seen += [job for job in rows if job["status"] == "running"]
            if len({job["updated_at"] for job in seen}) >= 3:
                break
            time.sleep(0.05)
        result = crawl.wait()
    finally:
        crawl.kill()
    result.assert_clean()
    updates = sorted({job["updated_at"] for job in seen})
    assert len(updates) >= 3, (
        f"the running job row was refreshed {len(updates) - 1} times; polls (seconds, statuses):"
        f" {polls}; {result.describe()}"
    )
    refreshed = [job for job in seen if job["updated_at"] > updates[0]]  # by heartbeats
    assert refreshed
    assert all(job["stats"] for job in refreshed)  # progress is visible in SQL
    assert all(job["finished_at"] is None for job in seen)
    assert result.stats.get("ingest/jobs/heartbeats", 0) >= 2
    [job] = db.jobs()
    assert job["status"] == "finished"
    assert job["updated_at"] > job["started_at"]


def test_a_crawl_never_takes_its_own_job_for_crashed(
    site: LocalSite, db: Database, tmp_path: Path
) -> None:
    # three heartbeats of 10 ms pass while the crawl opens the database, before its first
    # heartbeat: its own row must not look like that of a crawl that died
    result = run_crawl(
        {
            "base_url": site.base_url,
            "pages": 2,
            "per_page": 2,
            "settings": {"INGEST_DATABASE_URL": db.url, "INGEST_JOB_HEARTBEAT": 0.01},
        },
        tmp_path,
    )
    result.assert_clean()
    assert "marked crashed" not in result.output
    [job] = db.jobs()
    assert (job["status"], job["close_reason"]) == ("finished", "finished")


def test_rows_are_visible_before_the_crawl_ends(
    site: LocalSite, db: Database, tmp_path: Path
) -> None:
    total = SLOW_CRAWL["pages"] * SLOW_CRAWL["per_page"]
    crawl = Crawl(
        {
            "base_url": site.base_url,
            "settings": {
                "INGEST_DATABASE_URL": db.url,
                "INGEST_FLUSH_INTERVAL": 0.2,
                **SLOW_SETTINGS,
            },
            **SLOW_CRAWL,
        },
        tmp_path,
    )
    try:
        visible = 0
        while crawl.running:
            visible = db.table_exists("ingest_items") and db.count("ingest_items")
            if visible:
                break
            time.sleep(0.05)
        still_running = crawl.running
        result = crawl.wait()
    finally:
        crawl.kill()
    result.assert_clean()
    assert visible > 0, "no row was visible while the crawl ran"
    assert still_running
    assert visible < total
    assert db.count("ingest_items") == total


def test_an_item_replaced_by_an_earlier_pipeline_gets_no_url_not_a_wrong_one(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    # freed items' ids are reused by new ones: a noted URL must never attach to another item
    db = Database(sqlite_url)
    result = _crawl(
        site,
        db,
        tmp_path,
        pages=10,
        per_page=100,
        settings={"ITEM_PIPELINES": {"_crawl_script.ReplaceItemPipeline": 800}},
    )
    result.assert_clean()
    items = db.items()
    assert len(items) == 1000
    assert {item["url"] for item in items} == {None}


@pytest.mark.parametrize("reactor", ["asyncio", "default"])
def test_items_a_project_pipeline_drops_are_not_stored_and_its_changes_are(
    site: LocalSite, sqlite_url: str, tmp_path: Path, reactor: str
) -> None:
    # with the add-on, IngestItemProcessor runs the project's pipelines, then ours directly
    db = Database(sqlite_url)
    result = _crawl(
        site,
        db,
        tmp_path,
        reactor=reactor,
        pages=4,
        per_page=50,
        settings={"ITEM_PIPELINES": {"_crawl_script.DropOddItemsPipeline": 800}},
    )
    result.assert_clean()
    assert result.stats["item_dropped_count"] == 100
    items = db.items()
    assert sorted(item["data"]["idx"] for item in items) == list(range(0, 200, 2))
    assert {item["data"]["kept_by"] for item in items} == {"DropOddItemsPipeline"}
    assert all(item["url"].startswith(site.base_url) for item in items)
    assert result.stats["ingest/items/stored"] == 100
