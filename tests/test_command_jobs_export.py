"""``scrapy ingest jobs`` and ``scrapy ingest export``, run as users run them (the command in a
subprocess), against real databases: SQLite, PostgreSQL, MariaDB and chDB.

Most tests put their jobs and items in with the backends' own write path (in a subprocess:
chDB lets a process open one data path only); one exports what a real crawl stored."""

from __future__ import annotations

import ast
import csv
import datetime as dt
import json
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import REPO_DIR, Database, ingest_command, run_crawl

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
    "mysql",
    "chdb",
]
_FIXTURES = {"sqlite": "sqlite_url", "postgres": "pg_url", "mysql": "mysql_url", "chdb": "chdb_url"}

T0 = 1_760_000_000.0  # 2025-10-09 08:53:20 UTC

#: the items of job A, in the order they were scraped: unicode, nested values, numbers (none
#: that ClickHouse's JSON type changes: no nulls, no empty objects, no floats like 1.0)
ITEMS_A = [
    {"title": "Café ☕ — 日本語 🚀", "price": 12.5, "count": 3, "big": 9007199254740993},
    {"title": "second", "nested": {"sizes": ["S", "M"], "stock": {"S": 1, "M": 0}}, "ok": True},
    {"title": 'quote " and, comma', "price": -0.25, "count": 0, "tags": ["a", "b"]},
]
ITEMS_B = [{"title": "other job", "count": 7}, {"title": "other job 2", "count": 8}]

#: a job's items are written, through a backend, by this script in a subprocess
_SEED = """
import json, sys
from scrapy_ingest._ids import IdFactory
from scrapy_ingest.backends import make_backend
from scrapy_ingest.schema import all_tables
from scrapy_ingest.schema import table_spec

plan = json.loads(sys.argv[1])
tables = {t.kind: t for t in all_tables("ingest_")}
for name in plan.get("item_tables", []):
    tables[name] = table_spec("items", "ingest_", name)
backend = make_backend(plan["url"], list(tables.values()), create_tables=True)
backend.open()
for name in plan.get("item_tables", []):
    backend.create_table(tables[name])
new_id = IdFactory()
for job in plan.get("jobs", []):
    row = dict(job)
    for name in ("stats", "settings", "log_counts"):
        if name in row:
            row[name] = json.dumps(row[name]).encode()
    assert backend.insert_job(tables["jobs"], row)
columns = tables["items"].column_names
for table_name, job_id, spider, scraped_at, data in plan.get("items", []):
    values = {
        "id": new_id(scraped_at), "job_id": job_id, "spider": spider, "item_type": "dict",
        "url": "http://example.com/", "scraped_at": scraped_at,
        "data": json.dumps(data, ensure_ascii=False).encode(),
    }
    table = tables[table_name or "items"]
    row = tuple(values.get(name) for name in columns)
    backend.write(table, [row], idempotent=False)
backend.close()
"""


def _seed(url: str, **plan: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SEED, json.dumps({"url": url, **plan})],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def _job(job_id: str, spider: str, status: str, started: float, **more: Any) -> dict[str, Any]:
    """A job row: *status* ``finished`` ends 60 s after *started*, ``crashed`` 30 s after."""
    row: dict[str, Any] = {
        "job_id": job_id,
        "crawl_id": job_id,
        "spider": spider,
        "hostname": "host-1",
        "pid": 4242,
        "status": status,
        "started_at": started,
        "updated_at": started + 30,
        "items_count": 0,
        "requests_count": 0,
        "errors_count": 0,
        **more,
    }
    if status == "finished":
        row.update(close_reason="finished", updated_at=started + 60, finished_at=started + 60)
    elif status == "crashed":
        row.update(close_reason="crashed", finished_at=started + 30)
    return row


def _items(job_id: str, spider: str, items: list[dict[str, Any]], start: float) -> list[Any]:
    """Item rows for the seed script, written last scraped first (the export must sort)."""
    rows = [[None, job_id, spider, start + i * 0.5, data] for i, data in enumerate(items)]
    return rows[::-1]


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest) -> Database:
    return Database(request.getfixturevalue(_FIXTURES[request.param]))


@pytest.fixture
def jobs_db(db: Database) -> Database:
    """Five jobs, the latest started first: ``dead`` (shop, crashed), ``live`` (news, running),
    ``job-b`` (news, ITEMS_B), ``job-a`` (shop, ITEMS_A), ``old`` (shop, finished)."""
    now = time.time()
    _seed(
        db.url,
        jobs=[
            _job(
                "old", "shop", "finished", T0, items_count=1234, requests_count=56, errors_count=1
            ),
            _job("job-a", "shop", "finished", T0 + 10, items_count=3),
            _job("job-b", "news", "finished", T0 + 20, items_count=2),
            {**_job("live", "news", "running", now - 90, items_count=5), "updated_at": now},
            _job("dead", "shop", "crashed", now - 50, items_count=9, requests_count=10),
        ],
        # job B's items are scraped in between job A's: only the job id tells them apart
        items=[
            *_items("job-a", "shop", ITEMS_A, T0 + 11),
            *_items("job-b", "news", ITEMS_B, T0 + 11.2),
        ],
    )
    return db


def _export(
    db: Database, args: list[str], tmp_path: Path, **settings: Any
) -> subprocess.CompletedProcess[str]:
    settings = {"INGEST_DATABASE_URL": db.url, **settings}
    return ingest_command(["export", *args], settings, tmp_path)


def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# export


def test_export_writes_exactly_the_jobs_items(jobs_db: Database, tmp_path: Path) -> None:
    db = jobs_db
    out = tmp_path / "out" / "a.jsonl"  # a directory to create, as Scrapy's feed storage does
    done = _export(db, ["job-a", "-O", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert _jsonl(out) == ITEMS_A  # only job A's, in scrape order, values as stored
    assert "Exported 3 items of job job-a" in done.stdout
    assert "\r" not in done.stderr  # no progress line: stderr is not a terminal

    # -o appends (job B after job A)
    done = _export(db, ["job-b", "-o", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert _jsonl(out) == ITEMS_A + ITEMS_B

    csv_path = tmp_path / "a.csv"
    # without FEED_EXPORT_FIELDS, Scrapy's CSV exporter takes the first item's fields only
    fields = ["title", "price", "count", "big", "nested", "tags"]
    done = _export(db, ["job-a", "-O", str(csv_path)], tmp_path, FEED_EXPORT_FIELDS=fields)
    assert done.returncode == 0, done.stderr
    with csv_path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [row["title"] for row in rows] == [item["title"] for item in ITEMS_A]
    first, second, third = rows
    assert list(first) == fields
    assert (first["price"], first["count"], first["big"]) == ("12.5", "3", "9007199254740993")
    assert (second["price"], second["tags"]) == ("", "")
    # Scrapy's CSV exporter writes a nested dict as Python's repr, and joins lists with commas
    assert ast.literal_eval(second["nested"]) == ITEMS_A[1]["nested"]
    assert (third["price"], third["tags"]) == ("-0.25", "a,b")

    # an unknown job: exit 1, naming the way to list jobs, and the file left as it was
    before = csv_path.read_bytes()
    done = _export(db, ["no-such-job", "-O", str(csv_path)], tmp_path)
    assert done.returncode == 1
    assert "no-such-job" in done.stderr
    assert "scrapy ingest jobs" in done.stderr
    assert csv_path.read_bytes() == before


def test_export_formats_and_feed_settings(sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    _seed(
        db.url,
        jobs=[_job("job-a", "shop", "finished", T0), _job("empty", "shop", "finished", T0)],
        items=_items("job-a", "shop", ITEMS_A, T0),
    )
    # FILE:FORMAT and -t, as scrapy crawl takes them; -O replaces what -o appended
    named = tmp_path / "items.data"
    assert _export(db, ["job-a", "-o", f"{named}:json"], tmp_path).returncode == 0
    assert json.loads(named.read_text()) == ITEMS_A
    done = _export(db, ["job-a", "-O", str(named), "-t", "xml"], tmp_path)
    assert done.returncode == 0, done.stderr
    text = named.read_text(encoding="utf-8")
    assert text.startswith("<?xml") and text.count("<item>") == 3
    # FEED_EXPORT_FIELDS and FEED_EXPORT_ENCODING apply as in a crawl
    out = tmp_path / "a.csv"
    settings = {"FEED_EXPORT_FIELDS": ["count", "title"], "FEED_EXPORT_ENCODING": "utf-8"}
    done = _export(db, ["job-a", "-O", str(out)], tmp_path, **settings)
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8").splitlines()[:2] == [
        "count,title",
        "3,Café ☕ — 日本語 🚀",
    ]
    # a job that stored no items is known: an empty export, not an error
    done = _export(db, ["empty", "-O", str(tmp_path / "e.json")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "e.json").read_text()) == []
    # an unknown format: a usage error, naming the formats there are
    done = _export(db, ["job-a", "-O", str(tmp_path / "a.nope")], tmp_path)
    assert done.returncode == 2
    assert "jsonlines" in done.stderr


@pytest.mark.crawl
def test_export_after_a_real_crawl(site: LocalSite, sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    settings = {"INGEST_DATABASE_URL": db.url}
    crawl = {"base_url": site.base_url, "pages": 2, "per_page": 5, "settings": settings}
    run_crawl(crawl, tmp_path).assert_clean()
    [job] = db.jobs()
    _seed(
        db.url, jobs=[_job("other", "shop", "finished", T0)], items=_items("other", "s", ITEMS_B, 0)
    )
    out = tmp_path / "crawl.jsonl"
    done = _export(db, [job["job_id"], "-O", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    exported = _jsonl(out)
    stored = sorted(db.items("job_id = %s", (job["job_id"],)), key=lambda i: i["scraped_at"])
    assert exported == [item["data"] for item in stored]
    assert sorted(item["idx"] for item in exported) == list(range(10))


# jobs


def _jobs(db: Database, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return ingest_command(["jobs", *args], {"INGEST_DATABASE_URL": db.url}, tmp_path)


def _json_jobs(db: Database, args: list[str], tmp_path: Path) -> list[dict[str, Any]]:
    done = _jobs(db, ["--json", *args], tmp_path)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _ids(jobs: list[dict[str, Any]]) -> list[str]:
    return [job["job_id"] for job in jobs]


def test_jobs_lists_and_filters(jobs_db: Database, tmp_path: Path) -> None:
    db = jobs_db
    jobs = _json_jobs(db, [], tmp_path)
    assert _ids(jobs) == ["dead", "live", "job-b", "job-a", "old"]  # latest started first
    dead, live, _, _, old = jobs
    assert (old["status"], old["spider"], old["close_reason"]) == ("finished", "shop", "finished")
    assert (old["items_count"], old["requests_count"], old["errors_count"]) == (1234, 56, 1)
    assert old["started_at"] == "2025-10-09T08:53:20+00:00"
    assert dt.datetime.fromisoformat(old["finished_at"]).timestamp() == T0 + 60
    assert old["duration_seconds"] == 60
    assert (dead["status"], dead["items_count"], dead["duration_seconds"]) == ("crashed", 9, 30)
    assert live["status"] == "running"
    assert live["finished_at"] is None
    assert 89 <= live["duration_seconds"] < 300  # so far
    assert (live["hostname"], live["pid"]) == ("host-1", 4242)

    assert _ids(_json_jobs(db, ["--running"], tmp_path)) == ["live"]
    assert _ids(_json_jobs(db, ["--spider", "shop"], tmp_path)) == ["dead", "job-a", "old"]
    assert _ids(_json_jobs(db, ["--limit", "2"], tmp_path)) == ["dead", "live"]


def test_jobs_table(sqlite_url: str, tmp_path: Path) -> None:
    db = Database(sqlite_url)
    _seed(
        db.url,
        jobs=[
            _job(
                "old", "shop", "finished", T0, items_count=1234, requests_count=56, errors_count=1
            ),
            _job("dead", "shop", "crashed", T0 + 4000, items_count=9, requests_count=10),
        ],
    )
    done = _jobs(db, [], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "JOB ID  SPIDER  STATUS    STARTED (UTC)        DURATION  ITEMS  REQUESTS  ERRORS",
        "dead    shop    crashed   2025-10-09 10:00:00     30.0s      9        10       0",
        "old     shop    finished  2025-10-09 08:53:20    1m 00s  1,234        56       1",
    ]
    done = _jobs(db, ["--limit", "0"], tmp_path)
    assert done.returncode == 2
    assert "positive" in done.stderr


def test_jobs_of_several_databases(tmp_path: Path) -> None:
    main = Database(f"sqlite:///{tmp_path / 'main.sqlite3'}")
    routed = Database(f"sqlite:///{tmp_path / 'routed.sqlite3'}")
    stopped = "postgresql://crawler:s3cretpw@127.0.0.1:1/shop"  # nothing listens on port 1
    # one job, written to both databases; the copy in the main database was left behind (it
    # was down at the end): the freshest copy is shown, once
    stale = {**_job("both", "shop", "running", T0), "items_count": 1}
    _seed(main.url, jobs=[stale, _job("main-only", "shop", "finished", T0 + 1)])
    _seed(routed.url, jobs=[_job("both", "shop", "finished", T0, items_count=4)])
    routes = [{"kind": "items", "spider": "shop", "url": routed.url}]
    settings = {"INGEST_DATABASE_URL": main.url, "INGEST_ROUTES": routes}
    done = ingest_command(["jobs", "--json"], settings, tmp_path)
    assert done.returncode == 0, done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(j["job_id"], j["status"], j["items_count"]) for j in found] == [
        ("main-only", "finished", 0),
        ("both", "finished", 4),
    ]
    # a database that cannot be read: exit 1, saying which (never its password); the others'
    # jobs are still shown
    routes.append({"kind": "logs", "url": stopped})
    done = ingest_command(["jobs"], settings, tmp_path)
    assert done.returncode == 1
    assert "postgresql://crawler:***@127.0.0.1:1/shop" in done.stderr
    assert "s3cretpw" not in done.stderr + done.stdout
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["main-only", "both"]


def test_export_from_routed_tables(tmp_path: Path) -> None:
    main = Database(f"sqlite:///{tmp_path / 'main.sqlite3'}")
    routed = Database(f"sqlite:///{tmp_path / 'routed.sqlite3'}")
    _seed(
        main.url,
        jobs=[_job("job-a", "shop", "finished", T0)],
        items=_items("job-a", "shop", ITEMS_A[:1], T0),
    )
    _seed(
        routed.url,
        jobs=[_job("job-a", "shop", "finished", T0)],
        item_tables=["products"],
        items=[["products", "job-a", "shop", T0 + 1, ITEMS_A[1]]],
    )
    routes = [{"kind": "items", "item_type": "Product", "url": routed.url, "table": "products"}]
    settings = {"INGEST_DATABASE_URL": main.url, "INGEST_ROUTES": routes}
    out = tmp_path / "a.jsonl"
    done = ingest_command(["export", "job-a", "-O", str(out)], settings, tmp_path)
    assert done.returncode == 0, done.stderr
    assert _jsonl(out) == ITEMS_A[:2]
