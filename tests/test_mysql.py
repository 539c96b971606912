"""MySQL and MariaDB through the SQLAlchemy backend, against a real MariaDB server (Debian's
mariadb-server, started by the fixture, or SCRAPY_INGEST_TEST_MYSQL_URL)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from _helpers import Database, item_row, run_crawl

from scrapy_ingest._ids import IdFactory
from scrapy_ingest.backends import Batch, local_host
from scrapy_ingest.schema import all_tables

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

#: the tree crawl without its refused and TLS links: /tree, 4 pages, a redirect and its
#: target, a 404, and 3 attempts each of a 500 and a timeout
TREE_ROWS = 1 + 4 + 2 + 1 + 2 * 3


@pytest.mark.crawl
def test_a_crawl_into_mariadb(site: LocalSite, mysql_url: str, tmp_path: Path) -> None:
    db = Database(mysql_url)
    result = run_crawl(
        {
            "base_url": site.base_url,
            "spider": "tree",
            "settings": {"INGEST_DATABASE_URL": mysql_url},
        },
        tmp_path,
    )
    assert result.returncode == 0, result.describe()
    assert result.stats["finish_reason"] == "finished"
    items = db.rows("ingest_items")
    assert len(items) == 5
    pages = db.query("SELECT JSON_UNQUOTE(JSON_EXTRACT(data, '$.page')) FROM ingest_items")
    assert sorted(p for (p,) in pages) == sorted(item["url"] for item in items)
    assert db.count("ingest_requests") == TREE_ROWS
    logs = db.rows("ingest_logs")
    assert any("ValueError: boom on" in (log["exception"] or "") for log in logs)
    [job] = db.rows("ingest_jobs")
    assert (job["status"], job["items_count"], job["requests_count"]) == ("finished", 5, TREE_ROWS)
    latencies = [r["latency_ms"] for r in db.rows("ingest_requests") if r["status"] == 200]
    assert all(0 < latency < 1000 for latency in latencies)  # DOUBLE, not a rounded FLOAT
    create = db.query("SHOW CREATE TABLE ingest_items")[0][1]
    assert "datetime(6)" in create.lower()
    assert "json_valid" in create.lower() or " json" in create.lower()
    assert "utf8mb4" in create


@pytest.mark.crawl
def test_awkward_text_and_a_batch_written_twice(mysql_url: str) -> None:
    tables = {t.kind: t for t in all_tables("ingest_")}
    host = local_host(mysql_url, list(tables.values()), create_tables=True, retry_timeout=5)
    host.open()
    try:
        new_id, now = IdFactory(), time.time()
        texts = ["emoji \U0001f600", "nul \x00 inside", "lone \ud800 surrogate", "é"]
        rows = [
            item_row(new_id(now), "job", "s", "dict", text, now, orjson.dumps({"i": i}))
            for i, text in enumerate(texts)
        ]
        assert host.store(tables["items"], Batch(rows)).written == 4
        # written again after an unknown outcome: the idempotent path skips stored ids
        host.backend.write(tables["items"], rows, idempotent=True)
        host.backend.write(tables["items"], rows, idempotent=False)
    finally:
        host.close()
    db = Database(mysql_url)
    stored = sorted(db.query("SELECT url FROM ingest_items"))
    assert len(stored) == 4
    assert {u for (u,) in stored} == {
        "emoji \U0001f600",
        "nul \ufffd inside",
        "lone \ufffd surrogate",
        "é",
    }


# keyed items (INGEST_ITEM_KEYS): upserts, schema version 3

KEYED = {
    "INGEST_ITEM_KEYS": {"CatalogProduct": ["sku"]},
    "INGEST_HASH_EXCLUDE": ["seen_at"],
    "INGEST_KEEP_VERSIONS": True,
}
TABLES = all_tables("ingest_", keep_versions=True)
ITEMS = next(t for t in TABLES if t.kind == "items")
assert ITEMS.history is not None
#: the tables a crawl with INGEST_KEEP_VERSIONS prepares: the history of items too
KEYED_TABLES = [*TABLES, ITEMS.history]


def _keyed_row(new_id: IdFactory, key: str, content: str, now: float) -> tuple[Any, ...]:
    """A keyed item as the pipeline makes it: version 1, first and last seen now."""
    return item_row(
        new_id(now),
        "job",
        "s",
        "Product",
        None,
        now,
        orjson.dumps({"content": content}),
        item_key=key,
        content_hash=content,
        version=1,
        first_seen_at=now,
        last_seen_at=now,
    )


@pytest.mark.crawl
def test_keyed_items_in_mariadb_get_a_new_version_only_when_their_page_changes(
    site: LocalSite, mysql_url: str, tmp_path: Path
) -> None:
    db = Database(mysql_url)

    def crawl(workdir: Path) -> dict[str, Any]:
        result = run_crawl(
            {
                "base_url": site.base_url,
                "spider": "catalog",
                "catalog_size": 10,
                "settings": {"INGEST_DATABASE_URL": mysql_url, **KEYED},
            },
            workdir,
        )
        result.assert_clean()
        return result.stats

    first = crawl(tmp_path / "first")
    assert first["ingest/quality/CatalogProduct/new"] == 10
    before = {item["item_key"]: item for item in db.rows("ingest_items")}
    site.set_price(3, "99.00")
    try:
        second = crawl(tmp_path / "second")
    finally:
        site.reset()
    assert second["ingest/quality/CatalogProduct/changed"] == 1
    assert second["ingest/quality/CatalogProduct/unchanged"] == 9
    assert second.get("ingest/quality/CatalogProduct/new", 0) == 0
    after = {item["item_key"]: item for item in db.rows("ingest_items")}
    assert db.count("ingest_items") == 10
    assert sorted(after) == sorted(f"sku-{k}" for k in range(10))
    second_job = max(db.rows("ingest_jobs"), key=lambda job: job["started_at"])
    for key, item in after.items():
        old = before[key]
        assert item["first_seen_at"] == old["first_seen_at"]  # that of crawl 1
        assert item["last_seen_at"] > old["last_seen_at"]
        if key == "sku-3":
            assert (item["version"], item["data"]["price"]) == (2, "99.00")
            assert item["job_id"] == second_job["job_id"]
            assert item["content_hash"] != old["content_hash"]
        else:
            assert item["version"] == 1
            assert (item["id"], item["job_id"], item["data"]) == (
                old["id"],
                old["job_id"],
                old["data"],
            )
    [previous] = db.rows("ingest_item_versions")
    assert (previous["item_key"], previous["version"]) == ("sku-3", 1)
    assert previous["id"] == before["sku-3"]["id"]
    assert previous["data"]["price"] == before["sku-3"]["data"]["price"] != "99.00"
    assert second_job["quality"]["CatalogProduct"]["changed"] == 1
    assert second_job["quality"]["CatalogProduct"]["unchanged"] == 9
    create = db.query("SHOW CREATE TABLE ingest_items")[0][1]
    assert "UNIQUE KEY `ingest_items_item_type_item_key_idx`" in create
    assert "`item_key` varchar(255)" in create and "utf8mb4_bin" in create


@pytest.mark.crawl
def test_mariadb_keeps_item_keys_exact_and_bounds_the_long_ones(mysql_url: str) -> None:
    host = local_host(mysql_url, KEYED_TABLES, create_tables=True, retry_timeout=5)
    host.open()
    long_key = "https://example.com/p?" + "x" * 400
    keys = ["sku-1", "SKU-1", "é", "e", "nul \x00 key", long_key]
    try:
        new_id, now = IdFactory(), time.time()
        first = host.store(ITEMS, Batch([_keyed_row(new_id, k, "a", now) for k in keys]))
        assert (first.written, first.dead, first.changes) == (6, [], {"Product": [6, 0, 0]})
        # found again by the same keys: the long one bounded, the NUL replaced, as stored
        again = [_keyed_row(new_id, k, "a" if k != "e" else "b", now + 1) for k in keys]
        second = host.store(ITEMS, Batch(again))
        assert (second.written, second.dead, second.changes) == (6, [], {"Product": [0, 1, 5]})
        # "sku-1 " is "sku-1" to utf8mb4_bin (PAD SPACE): refused with the reason, in a batch
        # with others or alone, and never retried forever
        clash = [_keyed_row(new_id, "sku-1 ", "c", now + 2), _keyed_row(new_id, "new", "c", now)]
        third = host.store(ITEMS, Batch(clash))
        assert third.written == 1
        [(_, reason)] = third.dead
        assert reason.startswith("ItemKeyConflict: the key 'sku-1 ' of a Product item")
        assert "trailing spaces" in reason and "Fix:" in reason
        # both new in one batch: both would be inserted, and refused on every attempt; the
        # batch is split, and the second one refused for the first
        both = [_keyed_row(new_id, "twin", "c", now), _keyed_row(new_id, "twin ", "c", now)]
        fourth = host.store(ITEMS, Batch(both))
        assert fourth.written == 1
        [(_, reason)] = fourth.dead
        assert reason.startswith("ItemKeyConflict: the key 'twin ' of a Product item")
    finally:
        host.close()
    db = Database(mysql_url)
    stored = {
        key: version for key, version in db.query("SELECT item_key, version FROM ingest_items")
    }
    bounded = next(key for key in stored if key.startswith("https://"))
    assert len(bounded) == 255 and bounded.startswith(long_key[:222] + "~")
    assert stored.pop(bounded) == 1
    assert stored == {
        "sku-1": 1,
        "SKU-1": 1,
        "é": 1,
        "e": 2,
        "nul \ufffd key": 1,
        "new": 1,
        "twin": 1,
    }
    [(old_e,)] = db.query("SELECT JSON_EXTRACT(data, '$.content') FROM ingest_item_versions")
    assert orjson.loads(old_e) == "a"


@pytest.mark.crawl
def test_two_mariadb_writers_of_the_same_new_keys_store_each_once(mysql_url: str) -> None:
    hosts = [
        local_host(mysql_url, KEYED_TABLES, create_tables=True, retry_timeout=30) for _ in range(2)
    ]
    for host in hosts:
        host.open()
    new_id, now = IdFactory(), time.time()
    batches = [[_keyed_row(new_id, f"k{i}", "a", now) for i in range(200)] for _ in hosts]
    start = threading.Barrier(len(hosts))
    outcomes: list[Any] = [None] * len(hosts)

    def write(n: int) -> None:
        start.wait()
        outcomes[n] = hosts[n].store(ITEMS, Batch(batches[n]))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(hosts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for host in hosts:
            host.close()
    # one writer inserted the keys; the other found them (after a deadlock or a duplicate
    # key, retried) and only saw them again
    assert [(o.written, o.lost, o.dead) for o in outcomes] == [(200, 0, [])] * 2
    counts = sorted(o.changes["Product"] for o in outcomes)
    assert counts == [[0, 0, 200], [200, 0, 0]]
    assert Database(mysql_url).count("ingest_items") == 200


@pytest.mark.crawl
def test_mariadb_tables_of_schema_version_2_get_the_keyed_item_columns_and_index(
    mysql_url: str,
) -> None:
    host = local_host(mysql_url, KEYED_TABLES, create_tables=True, retry_timeout=5)
    host.open()
    host.close()
    db = Database(mysql_url)
    # back to version 2: no columns of version 3, no unique index, one item of then
    db.script(
        """
        ALTER TABLE ingest_items DROP INDEX ingest_items_item_type_item_key_idx,
            DROP COLUMN item_key, DROP COLUMN content_hash, DROP COLUMN version,
            DROP COLUMN first_seen_at, DROP COLUMN last_seen_at, DROP COLUMN errors;
        ALTER TABLE ingest_jobs DROP COLUMN quality;
        DROP TABLE ingest_item_versions;
        DELETE FROM ingest_schema_version;
        INSERT INTO ingest_schema_version VALUES (2, NOW(6));
        INSERT INTO ingest_items (id, job_id, spider, item_type, scraped_at, data)
            VALUES ('old', 'job', 's', 'Product', NOW(6), '{}');
        """
    )
    host = local_host(mysql_url, KEYED_TABLES, create_tables=True, retry_timeout=5)
    host.open()
    try:
        new_id, now = IdFactory(), time.time()
        outcome = host.store(ITEMS, Batch([_keyed_row(new_id, "k", "a", now)]))
        assert (outcome.written, outcome.changes) == (1, {"Product": [1, 0, 0]})
    finally:
        host.close()
    assert db.query("SELECT max(version) FROM ingest_schema_version") == [(3,)]
    create = db.query("SHOW CREATE TABLE ingest_items")[0][1]
    assert "UNIQUE KEY `ingest_items_item_type_item_key_idx`" in create
    # the item of version 2 keeps NULL keys; the keyed one is version 1 of its key
    found = db.query("SELECT id, item_key, version FROM ingest_items ORDER BY item_key")
    assert [(key, version) for _, key, version in found] == [(None, None), ("k", 1)]
    assert found[0][0] == "old"
