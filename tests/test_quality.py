"""Data quality: pydantic item schemas (INGEST_VALIDATION warn and strict), keyed upserts
with change tracking (INGEST_ITEM_KEYS, INGEST_KEEP_VERSIONS) and the job's quality figures,
on real crawls of the test site's catalog (tests/services.py: ``/catalog``, ``/product/<k>``).
The ClickHouse and MariaDB variants live in test_clickhouse.py and test_mysql.py."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from _helpers import Crawl, CrawlResult, Database, run_crawl

from scrapy_ingest.backends._upsert import StoredItem, content_hash, plan_upsert
from scrapy_ingest.config import IngestConfig
from scrapy_ingest.exceptions import ConfigError
from scrapy_ingest.quality import ItemChecks, key_text
from scrapy_ingest.records import RecordEncoder
from scrapy_ingest.schema import table_spec

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

KEYED = {
    "INGEST_ITEM_KEYS": {"CatalogProduct": ["sku"]},
    "INGEST_HASH_EXCLUDE": ["seen_at"],
    "INGEST_KEEP_VERSIONS": True,
}


def _catalog(
    site: LocalSite, url: str, tmp_path: Path, settings: dict[str, Any], size: int = 10
) -> CrawlResult:
    result = run_crawl(
        {
            "base_url": site.base_url,
            "spider": "catalog",
            "catalog_size": size,
            "settings": {"INGEST_DATABASE_URL": url, **settings},
        },
        tmp_path,
    )
    assert result.returncode == 0, result.describe()
    assert result.stats.get("finish_reason") == "finished", result.describe()
    return result


def _quality(result: CrawlResult, *names: str) -> dict[str, Any]:
    prefix = "ingest/quality/CatalogProduct/"
    return {name: result.stats.get(prefix + name) for name in names}


# validation


def test_warn_mode_stores_the_model_s_coerced_data(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    schemas = {"CatalogProduct": "_schemas.Product"}
    result = _catalog(site, sqlite_url, tmp_path, {"INGEST_ITEM_SCHEMAS": schemas})
    items = Database(sqlite_url).rows("ingest_items")
    assert len(items) == 10
    by_sku = {item["data"]["sku"]: item for item in items}
    # "sku-3" became the int 3, "13.00" a Decimal, stored exactly as text
    assert sorted(by_sku) == list(range(10))
    assert by_sku[3]["data"]["price"] == "13.00"
    # a datetime, stored as the ISO text of its UTC time
    seen_at = dt.datetime.fromisoformat(by_sku[3]["data"]["seen_at"])
    assert seen_at.utcoffset() == dt.timedelta(0)
    assert all(item["errors"] is None for item in items)
    assert _quality(result, "items", "valid", "invalid") == {
        "items": 10,
        "valid": 10,
        "invalid": 0,
    }
    assert result.stats["ingest/quality/CatalogProduct/coverage/price"] == 1.0


def test_warn_mode_stores_invalid_items_with_their_errors(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    settings = {"INGEST_ITEM_SCHEMAS": {"CatalogProduct": "_schemas.CheapProduct"}}
    result = _catalog(site, sqlite_url, tmp_path, settings)
    items = Database(sqlite_url).rows("ingest_items")
    assert len(items) == 10  # warn: every item is stored
    invalid = {item["data"]["sku"]: item["errors"] for item in items if item["errors"]}
    # prices 10.00 ... 19.00: 15.00 and up are refused
    assert sorted(invalid) == [f"sku-{k}" for k in range(5, 10)]
    [error] = invalid["sku-7"]
    assert error["field"] == "price"
    assert error["type"] == "less_than"
    assert error["value"] == "17.00"
    assert "less than 15" in error["message"]
    # an invalid item is stored as the spider made it
    assert {item["data"]["price"] for item in items if item["errors"]} >= {"17.00"}
    assert _quality(result, "valid", "invalid") == {"valid": 5, "invalid": 5}
    [job] = Database(sqlite_url).rows("ingest_jobs")
    assert job["quality"]["CatalogProduct"]["invalid"] == 5
    assert job["quality"]["CatalogProduct"]["coverage"]["sku"] == 1.0


def test_strict_mode_dead_letters_and_drops_invalid_items(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    settings = {
        "INGEST_ITEM_SCHEMAS": {"CatalogProduct": "_schemas.CheapProduct"},
        "INGEST_VALIDATION": "strict",
    }
    result = _catalog(site, sqlite_url, tmp_path, settings)
    db = Database(sqlite_url)
    stored = db.rows("ingest_items")
    assert sorted(item["data"]["sku"] for item in stored) == [f"sku-{k}" for k in range(5)]
    letters = db.dead_letters("items")
    assert len(letters) == 5
    assert all('"field":"price"' in letter["reason"] for letter in letters)
    assert all("CheapProduct" in letter["reason"] for letter in letters)
    assert any("sku-9" in letter["payload"] for letter in letters)
    assert result.stats["ingest/items/rejected"] == 5
    assert result.stats["item_dropped_count"] == 5
    assert result.stats["item_scraped_count"] == 5


def test_validation_off_stores_items_unchecked(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    settings = {
        "INGEST_ITEM_SCHEMAS": {"CatalogProduct": "_schemas.CheapProduct"},
        "INGEST_VALIDATION": "off",
    }
    result = _catalog(site, sqlite_url, tmp_path, settings)
    items = Database(sqlite_url).rows("ingest_items")
    assert len(items) == 10
    assert all(item["errors"] is None for item in items)
    assert "ingest/quality/CatalogProduct/invalid" not in result.stats


# keys and versions


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


def test_a_changed_page_gets_a_new_version_and_the_others_stay_unchanged(
    site: LocalSite, database_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    first = _catalog(site, database_url, tmp_path / "first", KEYED)
    assert _quality(first, "new", "changed", "unchanged") == {
        "new": 10,
        "changed": 0,
        "unchanged": 0,
    }
    before = {item["item_key"]: item for item in db.rows("ingest_items")}
    site.set_price(3, "99.00")
    try:
        second = _catalog(site, database_url, tmp_path / "second", KEYED)
    finally:
        site.reset()
    assert _quality(second, "new", "changed", "unchanged") == {
        "new": 0,
        "changed": 1,
        "unchanged": 9,
    }
    after = {item["item_key"]: item for item in db.rows("ingest_items")}
    assert sorted(after) == sorted(f"sku-{k}" for k in range(10))  # one row per key
    second_job = max(db.rows("ingest_jobs"), key=lambda job: job["started_at"])
    for key, item in after.items():
        old = before[key]
        assert item["first_seen_at"] == old["first_seen_at"]
        assert item["last_seen_at"] > old["last_seen_at"]  # seen by the second crawl
        if key == "sku-3":
            assert item["version"] == 2
            assert item["data"]["price"] == "99.00"
            assert item["id"] != old["id"]
            assert item["job_id"] == second_job["job_id"]
            assert item["content_hash"] != old["content_hash"]
        else:
            # only last_seen_at moved: the row of the first crawl, with its own seen_at
            assert item["version"] == 1
            assert (item["id"], item["job_id"], item["data"]) == (
                old["id"],
                old["job_id"],
                old["data"],
            )
    [previous] = db.rows("ingest_item_versions")
    assert previous["item_key"] == "sku-3"
    assert previous["version"] == 1
    assert previous["data"]["price"] == "13.00"
    assert previous["id"] == before["sku-3"]["id"]
    assert second_job["quality"]["CatalogProduct"]["changed"] == 1
    assert second_job["quality"]["CatalogProduct"]["unchanged"] == 9


def test_without_keep_versions_no_history_is_kept(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    settings = {**KEYED, "INGEST_KEEP_VERSIONS": False}
    _catalog(site, sqlite_url, tmp_path / "first", settings)
    site.set_price(1, "1.00")
    try:
        _catalog(site, sqlite_url, tmp_path / "second", settings)
    finally:
        site.reset()
    db = Database(sqlite_url)
    assert not db.table_exists("ingest_item_versions")
    [item] = db.rows("ingest_items", "item_key = %s", ("sku-1",))
    assert (item["version"], item["data"]["price"]) == (2, "1.00")


def test_an_item_without_its_key_goes_to_the_dead_letter_table(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    settings = {"INGEST_ITEM_KEYS": {"CatalogProduct": ["gtin"]}}
    result = _catalog(site, sqlite_url, tmp_path, settings)
    db = Database(sqlite_url)
    assert db.count("ingest_items") == 0
    letters = db.dead_letters("items")
    assert len(letters) == 10
    assert "its key field 'gtin'" in letters[0]["reason"]
    assert "INGEST_ITEM_KEYS['CatalogProduct']" in letters[0]["reason"]
    assert result.stats["item_scraped_count"] == 10  # not dropped: only not keyed


def test_two_processes_upserting_the_same_keys_end_with_one_row_per_key(
    site: LocalSite, database_url: str, tmp_path: Path
) -> None:
    size = 300
    settings = {"INGEST_DATABASE_URL": database_url, "INGEST_BATCH_ROWS": 10, **KEYED}
    args = {"base_url": site.base_url, "spider": "catalog", "catalog_size": size}
    crawls = [Crawl({**args, "settings": settings}, tmp_path / f"crawl-{n}") for n in range(2)]
    results = [crawl.wait() for crawl in crawls]
    for result in results:
        assert result.returncode == 0, result.describe()
        assert result.stats.get("ingest/items/lost") is None, result.describe()
    db = Database(database_url)
    assert db.count("ingest_items") == size
    assert len({item["item_key"] for item in db.rows("ingest_items")}) == size
    # each key is new to exactly one of them; the other saw it unchanged
    totals = [sum(_quality(r, name)[name] or 0 for r in results) for name in ("new", "unchanged")]
    assert totals == [size, size]
    assert db.count("ingest_item_versions") == 0


# the pieces


def _row(key: str, content: str, seen: float) -> tuple[Any, ...]:
    spec = table_spec("items", "ingest_")
    values = dict.fromkeys(spec.column_names)
    values.update(
        id=f"id-{key}-{seen}",
        item_type="T",
        item_key=key,
        content_hash=content,
        version=1,
        scraped_at=seen,
        first_seen_at=seen,
        last_seen_at=seen,
        data=b"{}",
    )
    return tuple(values[name] for name in spec.column_names)


def test_plan_upsert_orders_the_versions_of_one_batch() -> None:
    spec = table_spec("items", "ingest_")
    at = spec.position
    stored = {
        ("T", "a"): StoredItem("old-a", "h1", 4, 1.0),
        ("T", "b"): StoredItem("old-b", "h", 1, 1.0),
    }
    rows = [
        _row("a", "h1", 10.0),  # unchanged
        _row("a", "h2", 11.0),  # changed: version 5
        _row("a", "h3", 12.0),  # changed again: version 6, version 5 to the history
        _row("b", "h", 10.0),  # unchanged
        _row("c", "x", 10.0),  # new
        _row("c", "x", 11.0),  # unchanged (new in this batch)
    ]
    plan = plan_upsert(spec, rows, stored)
    assert plan.changes == {"T": [1, 2, 3]}
    assert [found.id for found in plan.archive] == ["old-a"]
    [archived] = plan.archive_rows
    assert (archived[at("content_hash")], archived[at("version")]) == ("h2", 5)
    [(found, row)] = plan.replaces
    assert found.id == "old-a"
    assert (row[at("content_hash")], row[at("version")], row[at("first_seen_at")]) == ("h3", 6, 1.0)
    assert [(found.id, seen) for found, seen in plan.touches] == [("old-b", 10.0)]
    [inserted] = plan.inserts
    assert (inserted[at("item_key")], inserted[at("last_seen_at")]) == ("c", 11.0)
    assert inserted[at("first_seen_at")] == 10.0


def test_key_text_is_readable_for_one_field_and_exact_for_several() -> None:
    assert key_text(["sku-1"]) == "sku-1"
    assert key_text([42]) == "42"
    assert key_text(["a", 1]) == '["a",1]'
    assert key_text([Decimal("1.50")]) == '["1.50"]'


def _checks(**settings: Any) -> ItemChecks:
    from scrapy.settings import Settings

    config = IngestConfig.from_settings(Settings(settings))
    checks = ItemChecks.from_config(config, RecordEncoder())
    assert checks is not None
    return checks


def test_the_content_hash_ignores_excluded_fields_and_key_order() -> None:
    checks = _checks(INGEST_ITEM_KEYS={"dict": ("sku",)}, INGEST_HASH_EXCLUDE=["seen_at"])
    one = checks.check({"sku": "a", "price": 1, "seen_at": "monday"})
    two = checks.check({"seen_at": "tuesday", "price": 1, "sku": "a"})
    three = checks.check({"sku": "a", "price": 2, "seen_at": "monday"})
    assert one.key == two.key == "a"
    # the writer computes the hash; the row carries the fields it leaves out
    assert one.content_hash == two.content_hash == ("seen_at",)
    hashes = [content_hash(c.data, c.content_hash) for c in (one, two, three)]
    assert hashes[0] == hashes[1] != hashes[2]
    assert checks.as_dict()["dict"]["coverage"] == {"price": 1.0, "seen_at": 1.0, "sku": 1.0}


class _Ambiguous(Mapping[str, int]):
    """A value the encoder stores but whose truth is undefined, like a numpy array."""

    def __getitem__(self, name: str) -> int:
        return {"a": 1, "b": 2}[name]

    def __iter__(self) -> Iterator[str]:
        return iter(("a", "b"))

    def __len__(self) -> int:
        return 2

    def __bool__(self) -> bool:
        raise ValueError("the truth value of this object is ambiguous")


@pytest.mark.parametrize("empty", [None, "", []], ids=["none", "empty-text", "empty-list"])
def test_a_value_whose_truth_is_undefined_is_stored_and_counted_as_filled(empty: Any) -> None:
    checks = _checks(INGEST_ITEM_KEYS={"dict": ("sku",)})
    checked = checks.check({"sku": "a", "sizes": _Ambiguous(), "note": empty})
    assert orjson.loads(checked.data) == {"note": empty, "sizes": {"a": 1, "b": 2}, "sku": "a"}
    # a field no item has filled yet is not listed (docs/validation.md)
    assert checks.as_dict()["dict"]["coverage"] == {"sizes": 1.0, "sku": 1.0}
    checks.check({"sku": "b", "sizes": _Ambiguous(), "note": "x"})  # every field filled
    assert checks.as_dict()["dict"]["coverage"] == {"note": 0.5, "sizes": 1.0, "sku": 1.0}


@pytest.mark.parametrize(
    "item",
    [
        {"sku": "a", "seen_at": "x", "price": 1.1, "n": -0.0, "big": 2**64 - 1, "small": -(2**63)},
        {"sku": "a", "seen_at": "x", "name": "caf\u00e9 \U0001f600 \x00 \ud800", "huge": 2**70},
        {"seen_at": "x", "sku": "a", "z": {"b": [1, {"y": None, "x": float("nan")}], "a": 1e-300}},
        {"sku": "a", "seen_at": "x", "when": dt.datetime(2024, 5, 1), "d": Decimal("1.50")},
        {"sku": "a", "seen_at": "x"},
    ],
)
def test_the_writers_content_hash_is_the_hash_of_the_item_encoded_without_the_fields(
    item: dict[str, Any],
) -> None:
    """Hashes stored by earlier versions (made on the reactor thread from the item without
    its excluded fields) stay the hashes of the same content."""
    checks = _checks(INGEST_ITEM_KEYS={"dict": ("sku",)}, INGEST_HASH_EXCLUDE=["seen_at", "t"])
    checked = checks.check(item)
    assert checked.content_hash == ("seen_at",)
    without = {name: value for name, value in item.items() if name != "seen_at"}
    expected = RecordEncoder().encode(without, sort_keys=True)
    assert content_hash(checked.data, checked.content_hash) == (
        hashlib.blake2b(expected, digest_size=16).hexdigest()
    )
    assert orjson.loads(checked.data) == {**orjson.loads(expected), "seen_at": "x"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"INGEST_ITEM_SCHEMAS": {"Product": "nowhere.Model"}},
            "INGEST_ITEM_SCHEMAS['Product'] ('nowhere.Model') is invalid: it cannot be imported",
        ),
        (
            {"INGEST_ITEM_SCHEMAS": {"Product": "decimal.Decimal"}},
            "it is not a pydantic model",
        ),
        ({"INGEST_ITEM_KEYS": {"Product": []}}, "INGEST_ITEM_KEYS['Product'] ([]) is invalid"),
        ({"INGEST_VALIDATION": "loud"}, "INGEST_VALIDATION ('loud') is invalid"),
        ({"INGEST_HASH_EXCLUDE": [1]}, "INGEST_HASH_EXCLUDE ([1]) is invalid"),
    ],
)
def test_a_wrong_setting_says_what_to_fix(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="Fix:") as raised:
        _checks(**settings)
    assert message in str(raised.value)


def test_plan_upsert_of_a_batch_stored_already_changes_nothing() -> None:
    spec = table_spec("items", "ingest_")
    rows = [_row("a", "h1", 10.0), _row("a", "h2", 11.0), _row("b", "h", 10.0)]
    first = plan_upsert(spec, rows, {})
    assert first.changes == {"T": [2, 1, 0]}
    # the write committed, its answer was lost: the batch is written again
    at = spec.position
    [(_, a), (_, b)] = [(None, r) for r in first.inserts]
    stored = {
        ("T", "a"): StoredItem(a[at("id")], "h2", 2, 10.0),
        ("T", "b"): StoredItem(b[at("id")], "h", 1, 10.0),
    }
    again = plan_upsert(spec, rows, stored)
    assert again.changes == {"T": [0, 0, 3]}
    assert (again.inserts, again.archive, again.archive_rows, again.replaces) == ([], [], [], [])


def test_a_routed_items_table_keeps_its_versions_beside_it(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    route = {"kind": "items", "item_type": "CatalogProduct", "url": sqlite_url, "table": "products"}
    settings = {**KEYED, "INGEST_ROUTES": [route]}
    _catalog(site, sqlite_url, tmp_path / "first", settings)
    site.set_price(2, "2.00")
    try:
        second = _catalog(site, sqlite_url, tmp_path / "second", settings)
    finally:
        site.reset()
    db = Database(sqlite_url)
    assert db.count("products") == 10
    [previous] = db.rows("products_versions")
    assert (previous["item_key"], previous["data"]["price"]) == ("sku-2", "12.00")
    assert db.count("ingest_item_versions") == 0
    assert _quality(second, "changed", "unchanged") == {"changed": 1, "unchanged": 9}
