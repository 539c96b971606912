"""``scrapy ingest prune`` and ``scrapy ingest migrate``, run as users run them (the real
command, in a subprocess), against SQLite, PostgreSQL, MariaDB and chDB."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
from _helpers import REPO_DIR, Crawl, Database, ingest_command, run_crawl, wait_for
from services import find_pg_bindir

from scrapy_ingest._redact import redact_url

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

DAY = 86400
#: tables a crawl with INGEST_KEEP_VERSIONS writes, and the kind of record each holds
TABLES = {
    "ingest_items": "items",
    "ingest_item_versions": "items",
    "ingest_requests": "requests",
    "ingest_logs": "logs",
    "ingest_dead_letters": "dead_letters",
}

#: writes rows through the backend's own write path, in a process of its own (chDB lets a
#: process use one data directory): for each table above, rows of job "old" dated 60 days
#: ago and of job "new" dated a day ago; a keyed item scraped 60 days ago but seen again a
#: day ago (job "seen"); job rows finished, crashed and running 60 days ago, and one
#: finished a day ago. argv: URL, now, count of old rows per table
_SEED = """
import json, sys
import orjson
from scrapy_ingest._ids import IdFactory
from scrapy_ingest.backends import local_host
from scrapy_ingest.schema import all_tables

url, now, old_rows = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
old, recent = now - 60 * 86400, now - 86400
specs = all_tables("ingest_", keep_versions=True)
by_kind = {t.kind: t for t in specs}
history = by_kind["items"].history
host = local_host(url, [*specs, history], create_tables=True, retry_timeout=5)
host.open()
new_id = IdFactory()

def row(table, **values):
    return tuple(values.get(name) for name in table.column_names)

def item(table, job, when, **more):
    return row(table, id=new_id(when), job_id=job, spider="s", item_type="Product",
               scraped_at=when, data=orjson.dumps({"job": job}), **more)

times = {"requests": "started_at", "logs": "logged_at", "dead_letters": "created_at"}
for kind, column in times.items():
    table = by_kind[kind]
    common = dict(spider="s", url="http://x/", method="GET", retry_times=0, playwright=False,
                  level=20, level_name="INFO", logger="x", message="m", kind="item", reason="r")
    rows = [row(table, id=new_id(old), job_id="old", **{column: old}, **common)
            for _ in range(old_rows)]
    rows.append(row(table, id=new_id(recent), job_id="new", **{column: recent}, **common))
    host.backend.write(table, rows, idempotent=False)
items = by_kind["items"]
rows = [item(items, "old", old) for _ in range(old_rows)]
rows += [item(items, "new", recent),
         item(items, "old", old, item_key="k-old", content_hash="h1", version=1,
              first_seen_at=old, last_seen_at=old + 1),
         item(items, "seen", old, item_key="k-seen", content_hash="h2", version=1,
              first_seen_at=old, last_seen_at=recent)]
host.backend.write(items, rows, idempotent=False)
versions = dict(content_hash="h0", version=1)  # replaced versions have keys
host.backend.write(history, [item(history, "old", old, item_key="k-old", **versions),
                             item(history, "new", recent, item_key="k-new", **versions)],
                   idempotent=False)
jobs = by_kind["jobs"]
for job_id, status, when in [("old-finished", "finished", old), ("old-crashed", "crashed", old),
                             ("old-running", "running", old), ("new", "finished", recent)]:
    host.backend.insert_job(jobs, {
        "job_id": job_id, "crawl_id": job_id, "spider": "s", "status": status,
        "started_at": when - 60, "updated_at": when,
        "finished_at": None if status == "running" else when, "items_count": 0,
    })
host.close()
"""


def seed(url: str, now: float, old_rows: int = 3) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SEED, url, str(now), str(old_rows)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_DIR)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(params=["sqlite", "postgres", "mariadb", "chdb"])
def url(request: pytest.FixtureRequest) -> str:
    fixture = {"sqlite": "sqlite_url", "postgres": "pg_url", "mariadb": "mysql_url"}
    return str(request.getfixturevalue(fixture.get(request.param, "chdb_url")))


def job_ids(db: Database, table: str) -> set[str]:
    return {str(job) for (job,) in db.query(f"SELECT DISTINCT job_id FROM {table}")}


# prune


@pytest.mark.crawl
def test_prune_deletes_only_what_is_older_and_never_a_running_job(url: str, tmp_path: Path) -> None:
    seed(url, time.time())
    db = Database(url)
    settings = {"INGEST_DATABASE_URL": url, "INGEST_KEEP_VERSIONS": True}
    # jobs only: the records of the other kinds stay, whatever their age
    done = ingest_command(["prune", "--older-than", "30d", "--kinds", "jobs"], settings, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ingest_jobs: 2 rows deleted" in done.stdout, done.stdout
    assert "ingest_items" not in done.stdout
    assert job_ids(db, "ingest_jobs") == {"old-running", "new"}
    assert job_ids(db, "ingest_requests") == {"old", "new"}

    done = ingest_command(["prune", "--older-than", "30d", "--batch-rows", "2"], settings, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for table in TABLES:
        expected = {"new", "seen"} if table == "ingest_items" else {"new"}
        assert job_ids(db, table) == expected, table
    assert job_ids(db, "ingest_jobs") == {"old-running", "new"}
    # 3 old rows in batches of 2 (one keyed old item more among items)
    assert "ingest_requests: 3 rows deleted" in done.stdout, done.stdout
    assert "ingest_items: 4 rows deleted" in done.stdout, done.stdout
    assert "ingest_item_versions: 1 rows deleted" in done.stdout, done.stdout
    assert "ingest_jobs: 0 rows deleted" in done.stdout, done.stdout


def test_prune_refuses_an_age_it_cannot_read(sqlite_url: str, tmp_path: Path) -> None:
    settings = {"INGEST_DATABASE_URL": sqlite_url}
    done = ingest_command(["prune", "--older-than", "30"], settings, tmp_path)
    assert done.returncode == 2
    assert "give a positive number and a unit" in done.stderr
    done = ingest_command(["prune", "--older-than", "3d", "--kinds", "pages"], settings, tmp_path)
    assert done.returncode == 2
    assert "choose among requests,logs,items,jobs,dead_letters" in done.stderr


@pytest.mark.crawl
def test_prune_beside_a_running_crawl_on_postgres(
    site: LocalSite, pg_url: str, tmp_path: Path
) -> None:
    old_rows = 1500
    seed(pg_url, time.time(), old_rows)
    db = Database(pg_url)
    crawl = Crawl(
        {
            "base_url": site.base_url,
            "pages": 20,
            "per_page": 50,
            "delay_ms": 1000,
            "settings": {
                "INGEST_DATABASE_URL": pg_url,
                "CONCURRENT_REQUESTS": 2,
                "INGEST_FLUSH_INTERVAL": 0.1,
            },
        },
        tmp_path / "crawl",
    )
    try:
        wait_for(
            lambda: db.count("ingest_items", "spider = 'ingest_test'") > 0,
            timeout=60,
            what="the crawl's first items",
        )
        done = ingest_command(
            ["prune", "--older-than", "30d", "--batch-rows", "100"],
            {"INGEST_DATABASE_URL": pg_url},
            tmp_path,
        )
        running = crawl.running
        result = crawl.wait()
    finally:
        crawl.kill()
    assert done.returncode == 0, done.stdout + done.stderr
    assert running, "the crawl ended before the prune did: make it slower"
    result.assert_clean()
    assert f"ingest_requests: {old_rows:,} rows deleted" in done.stdout, done.stdout
    assert f"ingest_items: {old_rows + 1:,} rows deleted" in done.stdout, done.stdout
    [job] = [j for j in db.jobs() if j["spider"] == "ingest_test"]
    assert job["status"] == "finished"
    assert db.count("ingest_items", "job_id = %s", (job["job_id"],)) == 20 * 50
    assert db.count("ingest_requests", "job_id = %s", (job["job_id"],)) == 20
    assert db.count("ingest_items", "job_id = 'old'") == 0


# migrate


def _apply(url: str, ddl: str, tmp_path: Path) -> None:
    """Run the DDL as a DBA would: psql, sqlite3, or statement by statement."""
    db = Database(url)
    if db.kind == "postgres":
        script = tmp_path / "ddl.sql"
        script.write_text(ddl)
        bindir = find_pg_bindir()
        assert bindir is not None
        done = subprocess.run(
            [str(bindir / "psql"), "-v", "ON_ERROR_STOP=1", "-q", "-f", str(script), url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    elif db.kind == "sqlite":
        conn = sqlite3.connect(db.sqlite_path)
        try:
            conn.executescript(ddl)
        finally:
            conn.close()
    else:
        statements = [s for s in ddl.split("\n;\n") if s.strip()]
        db.script(";\n".join(statements))


@pytest.mark.crawl
def test_migrate_sql_lets_a_crawl_store_everything_without_creating_tables(
    site: LocalSite, url: str, tmp_path: Path
) -> None:
    settings = {"INGEST_DATABASE_URL": url, "INGEST_CREATE_TABLES": False}
    done = ingest_command(["migrate", "--sql"], settings, tmp_path)
    assert done.returncode == 0, done.stderr
    ddl = done.stdout
    assert ddl.startswith(f"-- {redact_url(url)} (INGEST_DATABASE_URL)"), ddl[:200]
    assert ddl.count("\n;\n") >= 6
    assert not Database(url).table_exists("ingest_items"), "--sql changed the database"
    _apply(url, ddl, tmp_path)
    assert Database(url).query("SELECT max(version) FROM ingest_schema_version")[0][0] == 3
    result = run_crawl(
        {"base_url": site.base_url, "pages": 2, "per_page": 5, "settings": settings}, tmp_path
    )
    result.assert_clean()
    db = Database(url)
    [job] = db.rows("ingest_jobs")
    assert (job["status"], job["items_count"]) == ("finished", 10)
    assert db.count("ingest_items") == 10
    assert db.count("ingest_requests") == 2
    assert db.count("ingest_logs") > 0
    # the tables are what a crawl makes: migrate finds them up to date
    done = ingest_command(["migrate"], settings, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "schema version 3, up to date" in done.stdout


def test_migrate_sql_needs_no_connection_and_hides_the_password(tmp_path: Path) -> None:
    urls = [
        "postgresql://ingest:s3cretpw@127.0.0.1:1/shop",
        "mysql+pymysql://ingest:s3cretpw@127.0.0.1:1/shop",
        f"sqlite:///{tmp_path / 'nowhere' / 'x.sqlite3'}",
    ]
    for url in urls:
        done = ingest_command(["migrate", "--sql"], {"INGEST_DATABASE_URL": url}, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "s3cretpw" not in done.stdout + done.stderr
        assert "CREATE TABLE IF NOT EXISTS" in done.stdout
        assert "INSERT INTO" in done.stdout.splitlines()[-2]
    assert not (tmp_path / "nowhere").exists()


def test_migrate_creates_the_tables_and_reports_the_version(url: str, tmp_path: Path) -> None:
    settings = {"INGEST_DATABASE_URL": url}
    done = ingest_command(["migrate"], settings, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tables created, schema version 3" in done.stdout, done.stdout
    db = Database(url)
    assert all(db.table_exists(f"ingest_{kind}") for kind in ("items", "jobs", "requests"))
    assert db.query("SELECT max(version) FROM ingest_schema_version")[0][0] == 3


def test_migrate_upgrades_older_tables(sqlite_url: str, tmp_path: Path) -> None:
    settings = {"INGEST_DATABASE_URL": sqlite_url}
    assert ingest_command(["migrate"], settings, tmp_path).returncode == 0
    db = Database(sqlite_url)
    # schema version 2: no quality column, no version 3 row
    db.execute(
        "ALTER TABLE ingest_jobs DROP COLUMN quality; DELETE FROM ingest_schema_version; "
        "INSERT INTO ingest_schema_version VALUES (2, '2024-01-01 00:00:00.000000+00:00')"
    )
    done = ingest_command(["migrate"], settings, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "schema version 2 -> 3" in done.stdout, done.stdout
    columns = [row[1] for row in db.query("PRAGMA table_info(ingest_jobs)")]
    assert "quality" in columns
    assert db.query("SELECT max(version) FROM ingest_schema_version") == [(3,)]
