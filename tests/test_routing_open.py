"""Every database the settings name is open before the spider's first item: its tables are
there and the job row is in it, so the item path only buffers rows (no database is opened
from inside it)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from _helpers import Database, run_crawl

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = pytest.mark.crawl


def test_every_routed_database_is_open_before_the_first_item(
    site: LocalSite, tmp_path: Path
) -> None:
    paths = {name: tmp_path / f"{name}.sqlite3" for name in ("default", "products", "items")}
    products, items = (Database(f"sqlite:///{paths[name]}") for name in ("products", "items"))
    rules = [
        {"kind": "items", "item_type": "Product", "url": products.url, "table": "products"},
        {"kind": "items", "url": items.url},
        {"kind": "requests", "url": items.url},
    ]
    # the tables each database must hold before the first item; the default takes the logs
    expected = {
        str(paths["default"]): ["ingest_jobs", "ingest_logs"],
        str(paths["products"]): ["ingest_jobs", "products"],
        str(paths["items"]): ["ingest_items", "ingest_jobs", "ingest_requests"],
    }
    found_file = tmp_path / "found.json"
    settings = {
        "INGEST_DATABASE_URL": f"sqlite:///{paths['default']}",
        "INGEST_ROUTES": rules,
        "ITEM_PIPELINES": {"_open_check.OpenCheck": 100},
        "TEST_OPEN_CHECK": expected,
        "TEST_OPEN_CHECK_FILE": str(found_file),
    }
    result = run_crawl(
        {"base_url": site.base_url, "settings": settings, "pages": 1, "per_page": 4,
         "kind": "mixed"},
        tmp_path,
    )  # fmt: skip
    result.assert_clean()
    found = json.loads(found_file.read_text())
    for path, tables in expected.items():
        assert found[path] == {"tables": tables, "jobs": 1}, (path, found, result.describe())
    # and the items went where they were routed
    assert sorted(r["data"]["idx"] for r in products.rows("products")) == [0, 2]
    assert sorted(r["data"]["idx"] for r in items.rows("ingest_items")) == [1, 3]
