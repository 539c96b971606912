"""The ClickHouse backend, on chDB (the ClickHouse engine embedded in the writer process; the
only ClickHouse the CI machine can run), and on a real server when SCRAPY_INGEST_TEST_CH_URL
names one. Reads go through a subprocess: chDB lets a process open one data path only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from _helpers import Database, run_crawl

if TYPE_CHECKING:
    from pathlib import Path

    from _helpers import CrawlResult
    from services import LocalSite

pytestmark = pytest.mark.crawl

#: download attempts of the tree crawl without its refused and TLS links: /tree, 4 pages, a
#: redirect and its target, a 404, and 3 attempts each of a 500 and a timeout
TREE_ROWS = 1 + 4 + 2 + 1 + 2 * 3


def _tree(site: LocalSite, settings: dict, tmp_path: Path) -> CrawlResult:
    result = run_crawl(
        {"base_url": site.base_url, "spider": "tree", "settings": settings}, tmp_path
    )
    assert result.returncode == 0, result.describe()
    assert result.stats.get("finish_reason") == "finished", result.describe()
    return result


def test_a_crawl_into_chdb(site: LocalSite, chdb_url: str, tmp_path: Path) -> None:
    db = Database(chdb_url)
    result = _tree(site, {"INGEST_DATABASE_URL": chdb_url}, tmp_path)
    stats = result.stats
    items = db.rows("ingest_items")
    assert len(items) == stats["item_scraped_count"] == 5
    assert {item["data"]["page"] for item in items} == {item["url"] for item in items}
    requests = db.rows("ingest_requests")
    assert len(requests) == stats["ingest/requests/stored"] == TREE_ROWS
    assert {r["status"] for r in requests} >= {200, 302, 404, 500, None}
    logs = db.rows("ingest_logs")
    assert any("boom on" in (log["exception"] or "") for log in logs)
    [job] = db.rows("ingest_jobs")  # FINAL: the last version of the row
    assert (job["status"], job["close_reason"]) == ("finished", "finished")
    assert job["items_count"] == 5
    assert job["requests_count"] == TREE_ROWS
    # the spider's 5 warnings are stored; a warning of scrapy_ingest's own (a retried write,
    # say) is counted, not stored, and shows in the crawl's log
    warnings = [log for log in logs if log["level_name"] == "WARNING"]
    assert len(warnings) == 5, result.describe()
    assert job["log_counts"]["WARNING"] == stats["log_count/WARNING"], result.describe()
    # the types of docs/backends.md, and JSON queried as JSON
    create = db.query("SHOW CREATE TABLE ingest_items")[0][0]
    assert "`data` JSON" in create
    assert "DateTime64(6, 'UTC')" in create
    assert "ReplacingMergeTree" in create
    assert "ORDER BY (job_id, scraped_at, id)" in create
    assert "PARTITION BY toYYYYMM(scraped_at)" in create
    assert "LowCardinality(String)" in create
    pages = db.query("SELECT toString(data.page) FROM ingest_items ORDER BY id")
    assert [p for (p,) in pages] == [
        item["data"]["page"] for item in sorted(items, key=lambda i: i["id"])
    ]


@pytest.mark.postgres
def test_items_to_clickhouse_requests_to_postgres_logs_to_sqlite(
    site: LocalSite, chdb_url: str, pg_url: str, tmp_path: Path
) -> None:
    items, requests = Database(chdb_url), Database(pg_url)
    logs = Database(f"sqlite:///{tmp_path / 'logs.sqlite3'}")
    routes = {"items": items.url, "requests": requests.url, "logs": logs.url}
    stats = _tree(site, {"INGEST_DATABASE_URL": logs.url, "INGEST_ROUTES": routes}, tmp_path).stats
    assert len(items.rows("ingest_items")) == stats["item_scraped_count"] == 5
    assert requests.count("ingest_requests") == TREE_ROWS
    assert logs.count("ingest_logs") == stats["ingest/logs/stored"] > 0
    assert not items.table_exists("ingest_requests")
    assert not requests.table_exists("ingest_items")
    # one job row in each database, so that joins on job_id work inside each one
    job_ids = set()
    for db in (items, requests, logs):
        [job] = db.rows("ingest_jobs")
        assert job["status"] == "finished"
        assert job["items_count"] == 5
        job_ids.add(job["job_id"])
    assert len(job_ids) == 1
    [(joined,)] = items.query(
        "SELECT count() FROM ingest_items AS i JOIN ingest_jobs AS j FINAL ON i.job_id = j.job_id"
    )
    assert int(joined) == 5


def test_a_batch_written_again_is_stored_once(chdb_url: str, tmp_path: Path) -> None:
    # run in a subprocess of its own: chDB allows one data path per process
    import subprocess
    import sys

    script = f"""
import time, orjson
from scrapy_ingest.backends import Batch, local_host
from scrapy_ingest._ids import IdFactory
from scrapy_ingest.schema import all_tables
tables = {{t.kind: t for t in all_tables("ingest_")}}
host = local_host({chdb_url!r}, list(tables.values()), create_tables=True, retry_timeout=5)
host.open()
new_id, now = IdFactory(), time.time()
rows = [(new_id(now), "j", "s", "dict", None, now, orjson.dumps({{"i": i}})) for i in range(50)]
host.store(tables["items"], Batch(rows))
# the same batch again, as after a failure whose outcome was unknown: the idempotent path
again = rows[:30] + [(new_id(now), "j", "s", "dict", None, now, b'{{"i": 50}}')]
host.backend.write(tables["items"], again, idempotent=True)
client = host.backend._client
print(client.query("SELECT count(), count(DISTINCT id) FROM ingest_items").result_rows[0])
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(51, 51)"


def test_a_real_clickhouse_server_over_http(
    site: LocalSite, clickhouse_http_url: str, tmp_path: Path
) -> None:
    db = Database(clickhouse_http_url)
    stats = _tree(site, {"INGEST_DATABASE_URL": clickhouse_http_url}, tmp_path).stats
    assert len(db.rows("ingest_items")) == stats["item_scraped_count"]
    assert len(db.rows("ingest_requests")) == stats["ingest/requests/stored"]


def test_running_jobs_not_refreshed_in_time_are_marked_crashed(chdb_url: str) -> None:
    import subprocess
    import sys

    script = f"""
import time
from scrapy_ingest.backends import local_host
from scrapy_ingest.schema import all_tables
tables = {{t.kind: t for t in all_tables("ingest_")}}
host = local_host({chdb_url!r}, list(tables.values()), create_tables=True, retry_timeout=5)
host.open()
now = time.time()
def row(job_id, updated_at, status="running"):
    return dict(job_id=job_id, crawl_id="c", spider="s", hostname="h", pid=42, status=status,
                started_at=updated_at - 60, updated_at=updated_at, items_count=0)
host.insert_job(tables["jobs"], row("stale", now - 100))
host.insert_job(tables["jobs"], row("fresh", now - 1))
host.insert_job(tables["jobs"], row("done", now - 100, "finished"))
print(host.mark_crashed(tables["jobs"], now - 30))
found = host.backend._client.query(
    "SELECT job_id, status, close_reason FROM ingest_jobs FINAL ORDER BY job_id")
print(sorted(tuple(r) for r in found.result_rows))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    marked, rows = out.stdout.strip().splitlines()[-2:]
    assert marked == "['stale']"
    assert rows == (
        "[('done', 'finished', None), ('fresh', 'running', None), ('stale', 'crashed', 'crashed')]"
    )
