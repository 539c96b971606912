"""What reaches IngestPipeline that is not an item, and a project's own IngestPipeline subclass.

Plain Scrapy passes any value on (an earlier pipeline that forgot ``return item`` hands None to
the next one; a str a spider yields goes to the pipelines and to ``item_scraped``), and finishes
the crawl without an error (Scrapy's ``test_crawl.py::TestCrawl::test_start_unsupported_output``,
``test_logformatter.py::TestShowOrSkipMessages``). With the add-on the value is passed on the same
way, each one goes to the dead-letter table with its type in the reason and is counted, and the
crawl logs one WARNING about it, not one per value. Each crawl runs in a subprocess
(``_crawl_script.py``), through every path of ``IngestPipeline.capture``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import Database, run_crawl

if TYPE_CHECKING:
    from pathlib import Path

    from _helpers import CrawlResult
    from services import LocalSite

pytestmark = pytest.mark.crawl

PAGES, PER_PAGE = 3, 20
TOTAL = PAGES * PER_PAGE

#: the paths of IngestPipeline.capture: the fast one, with item keys (checked at once), and
#: with INGEST_DURABLE (a coroutine per item)
CAPTURE_PATHS = {
    "fast": {},
    "checked": {"INGEST_ITEM_KEYS": {"dict": ["idx"], "Product": ["idx"]}},
    "durable": {"INGEST_DURABLE": True},
}


def _crawl(site: LocalSite, url: str, tmp_path: Path, **args: Any) -> CrawlResult:
    settings = args.pop("settings", {})
    return run_crawl(
        {
            "base_url": site.base_url,
            "pages": PAGES,
            "per_page": PER_PAGE,
            "settings": {"INGEST_DATABASE_URL": url, **settings},
            **args,
        },
        tmp_path,
    )


def _warnings(result: CrawlResult) -> list[str]:
    return re.findall(r"^.* WARNING: .*$", result.output, re.MULTILINE)


def _assert_dead_lettered(
    result: CrawlResult, db: Database, type_name: str, payloads: list[str], cause: str
) -> None:
    result.assert_clean()  # finished, no ERROR, no traceback
    # passed on: Scrapy counts each value as scraped, as it does without the add-on
    assert result.stats["item_scraped_count"] == TOTAL, result.describe()
    assert result.stats["ingest/items/not_an_item"] == TOTAL
    assert result.stats["ingest/items/dead_letter"] == TOTAL
    assert "ingest/items/queued" not in result.stats
    assert db.count("ingest_items") == 0
    letters = db.dead_letters("items")
    assert len(letters) == TOTAL
    assert {letter["reason"] for letter in letters} == {
        f"not an item but a {type_name}; likely cause: {cause}"
    }
    assert sorted(letter["payload"] for letter in letters) == sorted(payloads)
    # once per crawl, with the likely cause
    about_it = [
        line for line in _warnings(result) if "not an item" in line or "dead-letter" in line
    ]
    assert len(about_it) == 1, result.describe()
    assert f"not an item but a {type_name}; likely cause: {cause}" in about_it[0]


@pytest.mark.parametrize("path", list(CAPTURE_PATHS))
@pytest.mark.parametrize("reactor", ["asyncio", "default"])
def test_none_from_an_earlier_pipeline_is_passed_on_dead_lettered_and_warned_about_once(
    site: LocalSite, sqlite_url: str, tmp_path: Path, reactor: str, path: str
) -> None:
    result = _crawl(
        site,
        sqlite_url,
        tmp_path,
        reactor=reactor,
        settings={
            "ITEM_PIPELINES": {"_crawl_script.ReturnsNothingPipeline": 800},
            **CAPTURE_PATHS[path],
        },
    )
    _assert_dead_lettered(
        result,
        Database(sqlite_url),
        "NoneType",
        ["None"] * TOTAL,
        "an item pipeline before IngestPipeline returned nothing (no `return item`)",
    )


@pytest.mark.parametrize("path", list(CAPTURE_PATHS))
def test_a_str_the_spider_yields_is_passed_on_dead_lettered_and_warned_about_once(
    site: LocalSite, sqlite_url: str, tmp_path: Path, path: str
) -> None:
    result = _crawl(site, sqlite_url, tmp_path, kind="str", settings=CAPTURE_PATHS[path])
    _assert_dead_lettered(
        result,
        Database(sqlite_url),
        "str",
        [repr(f"item-{i:05d}") for i in range(TOTAL)],
        "the spider yielded a value that is not an item",
    )


@pytest.mark.postgres
def test_not_items_are_dead_lettered_in_postgres(
    site: LocalSite, pg_url: str, tmp_path: Path
) -> None:
    result = _crawl(
        site,
        pg_url,
        tmp_path,
        settings={"ITEM_PIPELINES": {"_crawl_script.ReturnsNothingPipeline": 800}},
    )
    _assert_dead_lettered(
        result,
        Database(pg_url),
        "NoneType",
        ["None"] * TOTAL,
        "an item pipeline before IngestPipeline returned nothing (no `return item`)",
    )


# a subclass of IngestPipeline: its own process_item runs for every item

SUBCLASS_PIPELINES = {
    "scrapy_ingest.IngestPipeline": None,
    "_crawl_script.StampingIngestPipeline": 900,
}


@pytest.mark.parametrize(
    "processor",
    [
        # what the quickstart shows for use without the add-on: the one that skipped overrides
        "scrapy_ingest.IngestItemProcessor",
        # the add-on leaves Scrapy's where IngestPipeline itself is not enabled
        None,
    ],
)
@pytest.mark.parametrize("reactor", ["asyncio", "default"])
def test_a_subclass_overriding_process_item_has_it_called_for_every_item(
    site: LocalSite, sqlite_url: str, tmp_path: Path, reactor: str, processor: str | None
) -> None:
    settings: dict[str, Any] = {"ITEM_PIPELINES": SUBCLASS_PIPELINES}
    if processor is not None:
        settings["ITEM_PROCESSOR"] = processor
    result = _crawl(site, sqlite_url, tmp_path, reactor=reactor, settings=settings)
    result.assert_clean()
    assert result.stats["item_scraped_count"] == TOTAL
    items = Database(sqlite_url).items()
    assert len(items) == TOTAL
    assert [item["data"].get("stamped_by") for item in items] == ["StampingIngestPipeline"] * TOTAL
