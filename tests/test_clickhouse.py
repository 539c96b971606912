"""The ClickHouse backend, on chDB (the ClickHouse engine embedded in the writer process; the
only ClickHouse the CI machine can run), and on a real server when SCRAPY_INGEST_TEST_CH_URL
names one. Reads go through a subprocess: chDB lets a process open one data path only."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from _helpers import Database, parse_json, parse_timestamp, run_crawl

if TYPE_CHECKING:
    from pathlib import Path

    from _helpers import CrawlResult
    from services import LocalSite

pytestmark = pytest.mark.crawl

#: download attempts of the tree crawl without its refused and TLS links: /tree, 4 pages, a
#: redirect and its target, a 404, and 3 attempts each of a 500 and a timeout
TREE_ROWS = 1 + 4 + 2 + 1 + 2 * 3


#: what the scripts of _run_script share
_SCRIPT_HEAD = """
import json, time
import orjson
from scrapy_ingest.backends import Batch, local_host
from scrapy_ingest._ids import IdFactory
from scrapy_ingest.schema import all_tables
new_id = IdFactory()
"""


def _run_script(script: str) -> list[str]:
    """Run *script* in a Python process of its own (chDB opens one data path per process),
    after _SCRIPT_HEAD; return the lines it printed."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT_HEAD + script], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


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
    # one row per (item_type, item_key): not partitioned, since the engine collapses the
    # versions of a key within a partition only
    assert "ReplacingMergeTree(version)" in create
    assert "ORDER BY (item_type, item_key)" in create
    assert "PARTITION BY" not in create
    assert "`item_key` String DEFAULT toString(id)," in create
    assert "`version` Int64," in create
    assert "`errors` Nullable(String)" in create  # a list, which the JSON type cannot hold
    assert "LowCardinality(String)" in create
    # an item without a key is a row of its own: its id as key, version 0
    assert all(item["item_key"] == item["id"] for item in items)
    assert {item["version"] for item in items} == {0}
    assert {item["content_hash"] for item in items} == {None}
    create = db.query("SHOW CREATE TABLE ingest_requests")[0][0]
    assert "ORDER BY (job_id, started_at, id)" in create
    assert "PARTITION BY toYYYYMM(started_at)" in create
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
    script = f"""
tables = {{t.kind: t for t in all_tables("ingest_")}}
host = local_host({chdb_url!r}, list(tables.values()), create_tables=True, retry_timeout=5)
host.open()
new_id, now = IdFactory(), time.time()
def row(i):
    return (new_id(now), "j", "s", "dict", None, now, *[None] * 6, orjson.dumps({{"i": i}}))
rows = [row(i) for i in range(50)]
host.store(tables["items"], Batch(rows))
# the same batch again, as after a failure whose outcome was unknown: the idempotent path
again = rows[:30] + [row(50)]
host.backend.write(tables["items"], again, idempotent=True)
client = host.backend._client
print(client.query("SELECT count(), count(DISTINCT id) FROM ingest_items").result_rows[0])
"""
    lines = _run_script(script)
    assert lines[-1] == "(51, 51)"


def test_a_real_clickhouse_server_over_http(
    site: LocalSite, clickhouse_http_url: str, tmp_path: Path
) -> None:
    db = Database(clickhouse_http_url)
    stats = _tree(site, {"INGEST_DATABASE_URL": clickhouse_http_url}, tmp_path).stats
    assert len(db.rows("ingest_items")) == stats["item_scraped_count"]
    assert len(db.rows("ingest_requests")) == stats["ingest/requests/stored"]


def test_running_jobs_not_refreshed_in_time_are_marked_crashed(chdb_url: str) -> None:
    script = f"""
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
host.insert_job(tables["jobs"], row("mine", now - 100))  # the crawl asking: alive
host.insert_job(tables["jobs"], row("late", now - 100))
host.insert_job(tables["jobs"], dict(row("other", now - 100), crawl_id="other crawl"))
# at a heartbeat: only the jobs of the crawl asking; at start, every crawl's
print(sorted(host.mark_crashed(tables["jobs"], now - 30, "mine", "c")))
print(sorted(host.mark_crashed(tables["jobs"], now - 30, "mine")))
# a heartbeat of a crawl taken for crashed revives its row; a closed row stays closed
alive = dict(status="running", close_reason=None, finished_at=None, updated_at=time.time())
for job_id in ("late", "done"):
    host.update_job(tables["jobs"], job_id, alive, unless_finished=True)
found = host.backend._client.query(
    "SELECT job_id, status, close_reason FROM ingest_jobs FINAL ORDER BY job_id")
print(sorted(tuple(r) for r in found.result_rows))
"""
    lines = _run_script(script)
    marked, marked_at_start, rows = lines[-3:]
    assert marked == "['late', 'stale']"
    assert marked_at_start == "['other']"
    assert rows == (
        "[('done', 'finished', None), ('fresh', 'running', None), ('late', 'running', None),"
        " ('mine', 'running', None), ('other', 'crashed', 'crashed'),"
        " ('stale', 'crashed', 'crashed')]"
    )


# keyed items (INGEST_ITEM_KEYS): one current row per key, ReplacingMergeTree(version)

#: CatalogProduct keyed on its sku, its scrape time out of the content hash, versions kept
KEYED = {
    "INGEST_ITEM_KEYS": {"CatalogProduct": ["sku"]},
    "INGEST_HASH_EXCLUDE": ["seen_at"],
    "INGEST_KEEP_VERSIONS": True,
}
QUALITY = "ingest/quality/CatalogProduct"


def _catalog(site: LocalSite, settings: dict, workdir: Path) -> CrawlResult:
    result = run_crawl(
        {"base_url": site.base_url, "spider": "catalog", "catalog_size": 10, "settings": settings},
        workdir,
    )
    assert result.returncode == 0, result.describe()
    assert result.stats.get("finish_reason") == "finished", result.describe()
    return result


def _seen(row: dict, name: str) -> float:
    return parse_timestamp(row[name]).timestamp()


def _within(at: float, job: dict) -> bool:
    return _seen(job, "started_at") <= at <= _seen(job, "finished_at")


def test_keyed_items_in_chdb_get_a_new_version_only_when_their_page_changes(
    site: LocalSite, chdb_url: str, tmp_path: Path
) -> None:
    db = Database(chdb_url)
    settings = {"INGEST_DATABASE_URL": chdb_url, **KEYED}
    first = _catalog(site, settings, tmp_path / "first")
    site.set_price(3, "99.00")
    second = _catalog(site, settings, tmp_path / "second")
    first.assert_clean()
    second.assert_clean()

    assert [first.stats.get(f"{QUALITY}/{n}") for n in ("new", "changed", "unchanged")] == [
        10,
        0,
        0,
    ], first.describe()
    assert [second.stats.get(f"{QUALITY}/{n}") for n in ("new", "changed", "unchanged")] == [
        0,
        1,
        9,
    ], second.describe()
    job_one, job_two = sorted(db.rows("ingest_jobs"), key=lambda job: job["started_at"])
    for job, figures in ((job_one, (10, 0, 0)), (job_two, (0, 1, 9))):
        quality = parse_json(job["quality"])["CatalogProduct"]
        assert (quality["new"], quality["changed"], quality["unchanged"]) == figures, quality
        assert quality["items"] == 10

    # FINAL: the current row of each key
    items = {item["item_key"]: item for item in db.rows("ingest_items")}
    assert sorted(items) == sorted(f"sku-{k}" for k in range(10))
    for key, item in items.items():
        changed = key == "sku-3"
        assert item["version"] == (2 if changed else 1), item
        assert item["data"]["price"] == ("99.00" if changed else f"{10 + int(key[4:])}.00")
        # a new version is the second crawl's row; an unchanged one keeps its first row
        assert item["job_id"] == (job_two if changed else job_one)["job_id"], item
        assert _within(_seen(item, "first_seen_at"), job_one), item
        assert _within(_seen(item, "last_seen_at"), job_two), item
        assert len(item["content_hash"]) == 32
    [(count,)] = db.query("SELECT count() FROM ingest_items FINAL")
    assert int(count) == 10
    # the replaced version, and only it, in the history
    [old] = db.rows("ingest_item_versions")
    assert (old["item_key"], old["version"], old["job_id"]) == ("sku-3", 1, job_one["job_id"])
    assert old["data"]["price"] == "13.00"
    assert old["content_hash"] != items["sku-3"]["content_hash"]
    assert _seen(old, "first_seen_at") == _seen(items["sku-3"], "first_seen_at")
    assert _within(_seen(old, "last_seen_at"), job_one)


def test_keyed_items_in_an_items_table_of_the_old_layout_are_dead_lettered(
    site: LocalSite, chdb_url: str, tmp_path: Path
) -> None:
    db = Database(chdb_url)
    # the tables of schema version 2, items as scrapy-ingestion made them then
    db.script(
        """
        CREATE TABLE ingest_items (id UUID, job_id String, spider LowCardinality(String),
            item_type LowCardinality(String), url Nullable(String),
            scraped_at DateTime64(6, 'UTC'), data String)
            ENGINE = ReplacingMergeTree ORDER BY (job_id, scraped_at, id)
            PARTITION BY toYYYYMM(scraped_at);
        CREATE TABLE ingest_schema_version (version Int32, applied_at DateTime64(6, 'UTC'))
            ENGINE = ReplacingMergeTree ORDER BY version;
        INSERT INTO ingest_schema_version VALUES (2, now64());
        """
    )
    keyed = _catalog(site, {"INGEST_DATABASE_URL": chdb_url, **KEYED}, tmp_path / "keyed")
    assert keyed.stats.get("ingest/items/dead_letter") == 10, keyed.describe()
    assert "ingest/items/stored" not in keyed.stats, keyed.describe()
    letters = [letter for letter in db.dead_letters() if letter["kind"] == "items"]
    assert len(letters) == 10
    for letter in letters:
        reason = letter["reason"]
        assert reason.startswith("the database refused it: SchemaError: the table ingest_items")
        assert "ORDER BY (job_id, scraped_at, id) PARTITION BY toYYYYMM(scraped_at)" in reason
        assert "ReplacingMergeTree(version) ORDER BY (item_type, item_key)" in reason
        assert "INGEST_ROUTES" in reason and "RENAME TABLE ingest_items" in reason
        # the item's JSON as the writer process had it (as text: json_as_text), not a row
        assert parse_json(letter["payload"])["sku"].startswith("sku-")
    assert db.count("ingest_items") == 0

    # items without a key still go there, the columns of schema version 3 added
    unkeyed = _catalog(site, {"INGEST_DATABASE_URL": chdb_url}, tmp_path / "unkeyed")
    assert unkeyed.stats.get("ingest/items/stored") == 10, unkeyed.describe()
    items = db.rows("ingest_items")
    assert len(items) == 10
    assert {(item["item_key"], item["version"]) for item in items} == {(None, None)}
    [(version,)] = db.query("SELECT max(version) FROM ingest_schema_version")
    assert int(version) == 3


def test_a_batchs_texts_and_nulls_are_stored_as_given(chdb_url: str) -> None:
    # one column with texts that need cleaning (a NUL, a lone surrogate) beside texts that do
    # not and NULLs; columns NULL in every row, which the insert leaves out; one NULL in some
    # rows only
    import json

    script = f"""
tables = {{t.kind: t for t in all_tables("ingest_")}}
requests = tables["requests"]
host = local_host({chdb_url!r}, list(tables.values()), create_tables=True, retry_timeout=5)
host.open()
def row(n, proxy, status, error):
    values = {{"id": new_id(), "job_id": "j", "spider": "s", "url": f"http://a/{{n}}",
              "method": "GET", "status": status, "started_at": 1_700_000_000.0 + n,
              "retry_times": 0, "proxy": proxy, "error": error, "playwright": False}}
    return tuple(values.get(name) for name in requests.column_names)
proxies = ["http://p/1", "http://p/\\u00fc\\x00", "http://p/1", "http://p/\\ud800", None]
rows = [row(n, proxy, 200 if n != 3 else None, "boom" if n == 2 else None)
        for n, proxy in enumerate(proxies)]
print(host.store(requests, Batch(rows)).written)
print(json.dumps(host.backend._client.query(
    "SELECT proxy, status, error, fingerprint, latency_ms, parent_id FROM ingest_requests "
    "ORDER BY started_at").result_rows))
"""
    lines = _run_script(script)
    written, stored = lines[-2:]
    assert written == "5"
    assert json.loads(stored) == [
        ["http://p/1", 200, None, None, None, None],
        ["http://p/\u00fc\ufffd", 200, None, None, None, None],
        ["http://p/1", 200, "boom", None, None, None],
        ["http://p/\ufffd", None, None, None, None, None],
        [None, 200, None, None, None, None],
    ]


def test_keyed_rows_written_straight_to_the_backend(chdb_url: str) -> None:
    # several versions of a key in one batch, a key seen again, keys whose text the database
    # cleans, and an item without a key next to keyed ones
    import json

    script = f"""
tables = {{t.kind: t for t in all_tables("ingest_", keep_versions=True)}}
items = tables["items"]
host = local_host({chdb_url!r}, list(tables.values()), create_tables=True, retry_timeout=5)
host.open()
def row(key, digest, at, value):
    keyed = key is not None
    return (new_id(at), "j", "s", "T", None, at, key, digest, 1 if keyed else None,
            at if keyed else None, at if keyed else None, None, json.dumps({{"v": value}}).encode())
odd = "it's a \\\\ key\\x00"
t = 1_700_000_000.0
print(host.store(items, Batch([row("a", "h1", t, 1), row("b", "h1", t, 2), row("a", "h2", t + 1, 3),
                               row(odd, "h1", t, 4), row(None, None, t, 5)])).changes)
print(host.store(items, Batch([row("a", "h2", t + 10, 6), row(odd, "h1", t + 10, 7)])).changes)
client = host.backend._client
print(json.dumps(client.query(
    "SELECT item_key, version, toFloat64(first_seen_at), toFloat64(last_seen_at), "
    "toJSONString(data) FROM ingest_items FINAL ORDER BY version, item_key").result_rows))
print(json.dumps(client.query(
    "SELECT item_key, version, toJSONString(data) FROM ingest_item_versions FINAL").result_rows))
"""
    lines = _run_script(script)
    first, second, current, history = lines[-4:]
    assert first == "{'T': [3, 1, 0]}"
    assert second == "{'T': [0, 0, 2]}"
    t = 1_700_000_000.0
    rows = json.loads(current)
    unkeyed = rows.pop(0)  # version 0, its id as key
    assert unkeyed[1:] == [0, None, None, '{"v":5}']
    assert rows == [
        ["b", 1, t, t, '{"v":2}'],
        ["it's a \\ key\ufffd", 1, t, t + 10, '{"v":4}'],
        ["a", 2, t, t + 10, '{"v":3}'],
    ]
    assert json.loads(history) == [["a", 1, '{"v":1}']]


def test_items_without_a_key_are_stored_under_their_id_whatever_the_tables_defaults(
    chdb_url: str,
) -> None:
    # an items table made by the backend fills in item_key (DEFAULT toString(id)) and version
    # itself; one made by hand, without that default or with another one, is given both
    import json

    script = f"""
tables = [t for prefix in ("ingest_", "bare_", "other_") for t in all_tables(prefix)]
host = local_host({chdb_url!r}, tables, create_tables=True, retry_timeout=5)
backend = host.backend
items = {{t.name: t for t in tables if t.kind == "items"}}
host.open()
made = backend._create_table_sql(items["ingest_items"])
assert "`item_key` String DEFAULT toString(id)," in made, made
backend._client.command("DROP TABLE bare_items")
backend._client.command("DROP TABLE other_items")
backend._client.command(made.replace("ingest_items", "bare_items").replace(
    " DEFAULT toString(id)", ""))
backend._client.command(made.replace("ingest_items", "other_items").replace(
    "DEFAULT toString(id)", "DEFAULT 'x'"))
t = time.time()
for name, table in items.items():
    rows = [(new_id(t), "j", "s", "T", None, t, *(None,) * 6, b'{{"n":%d}}' % n)
            for n in range(5)]
    assert host.store(table, Batch(rows)).written == 5
    print(json.dumps([name, *backend._client.query(
        f"SELECT count(), countIf(item_key = toString(id)), countIf(version = 0) FROM {{name}}"
    ).result_rows[0]]))
"""
    lines = _run_script(script)
    assert [json.loads(line) for line in lines[-3:]] == [
        ["ingest_items", 5, 5, 5],
        ["bare_items", 5, 5, 5],
        ["other_items", 5, 5, 5],
    ]


def test_a_table_without_a_column_the_backend_writes_is_a_refusal_with_the_fix(
    chdb_url: str,
) -> None:
    # the backend gives each insert the column types it read from the table once; when the
    # table changes, the insert the server refuses is retried once, with the types read
    # again, and a column the table lacks is named: the database refuses the crawl (no record
    # of it can be stored there), with the fix, as PostgreSQL's undefined column does
    import json

    script = f"""
tables = {{t.kind: t for t in all_tables("ingest_")}}
logs = tables["logs"]
host = local_host({chdb_url!r}, list(tables.values()), create_tables=True, retry_timeout=5)
host.open()
def row(n):
    values = {{"id": new_id(), "job_id": "j", "spider": "s", "logged_at": time.time(),
              "level": 30, "level_name": "WARNING", "logger": "x", "message": f"m{{n}}"}}
    return tuple(values.get(name) for name in logs.column_names)
print(host.store(logs, Batch([row(0), row(1)])).written)
host.backend._client.command("ALTER TABLE ingest_logs DROP COLUMN logger")
outcome = host.store(logs, Batch([row(2), row(3)]))
print(json.dumps([outcome.written, len(outcome.dead), outcome.lost, outcome.refused]))
"""
    lines = _run_script(script)
    first, second = lines[-2:]
    assert first == "2"
    written, dead, lost, refused = json.loads(second)
    assert (written, dead, lost) == (0, 0, 2)  # no journal here: given up, and counted
    assert "missing in ClickHouse at chdb://" in refused
    assert "column logger in table default.ingest_logs" in refused
    assert "Fix: run `scrapy ingest migrate`" in refused
