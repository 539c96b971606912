"""A database that refuses one record of a batch costs only that record: the batch is split
until the refused records are found, they go to the dead-letter table with the database's
reason, and every other item is stored.

The refusal is real: the items table is created beforehand, exactly as scrapy_ingest would
create it, plus a CHECK constraint that rejects items with a ``poison`` key. Table creation
(``INGEST_CREATE_TABLES``, default True) keeps the existing table."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from _crawl_script import title
from _helpers import Database, run_crawl

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = pytest.mark.crawl

# columns and types of schema.py's "items" table, as backends/postgres.py and
# backends/sqlalchemy.py declare them
POSTGRES_ITEMS = """
CREATE TABLE ingest_items (
    id uuid NOT NULL,
    job_id text NOT NULL,
    spider text NOT NULL,
    item_type text NOT NULL,
    url text,
    scraped_at timestamptz NOT NULL,
    item_key text,
    content_hash text,
    version bigint,
    first_seen_at timestamptz,
    last_seen_at timestamptz,
    errors jsonb,
    data jsonb NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT no_poison CHECK (NOT (data ? 'poison'))
)
"""
SQLITE_ITEMS = """
CREATE TABLE ingest_items (
    id VARCHAR(36) NOT NULL,
    job_id TEXT NOT NULL,
    spider TEXT NOT NULL,
    item_type TEXT NOT NULL,
    url TEXT,
    scraped_at VARCHAR(32) NOT NULL,
    item_key TEXT,
    content_hash TEXT,
    version BIGINT,
    first_seen_at VARCHAR(32),
    last_seen_at VARCHAR(32),
    errors TEXT,
    data TEXT NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT no_poison CHECK (json_extract(data, '$.poison') IS NULL)
);
"""

PAGES, PER_PAGE = 4, 50
TOTAL = PAGES * PER_PAGE
POISON = [5, 60, 199]  # two in the first batch of 100, one in the last


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
@pytest.mark.parametrize("reactor", ["asyncio", "default"])
def test_refused_records_go_to_dead_letters_and_the_rest_is_stored(
    request: pytest.FixtureRequest, site: LocalSite, tmp_path: Path, backend: str, reactor: str
) -> None:
    db = Database(request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url"))
    db.execute(POSTGRES_ITEMS if backend == "postgres" else SQLITE_ITEMS)

    result = run_crawl(
        {
            "base_url": site.base_url,
            "reactor": reactor,
            "pages": PAGES,
            "per_page": PER_PAGE,
            "poison": POISON,
            "settings": {"INGEST_DATABASE_URL": db.url, "INGEST_BATCH_ROWS": 100},
        },
        tmp_path,
    )
    result.assert_clean()

    stored = sorted(item["data"]["idx"] for item in db.items())
    assert stored == [i for i in range(TOTAL) if i not in POISON]

    dead = db.dead_letters("items")
    assert len(dead) == len(POISON)
    assert len(db.dead_letters()) == len(POISON)
    payloads = sorted((json.loads(d["payload"]) for d in dead), key=lambda data: data["idx"])
    assert [p["idx"] for p in payloads] == POISON
    assert [p["title"] for p in payloads] == [title(i) for i in POISON]
    assert all(p["poison"] is True for p in payloads)
    for letter in dead:
        reason = letter["reason"]
        assert "refused" in reason, reason
        assert "check constraint" in reason.lower(), reason
        if backend == "postgres":
            assert "no_poison" in reason, reason
        assert letter["created_at"] is not None

    [job] = db.jobs()
    assert {d["job_id"] for d in dead} == {job["job_id"]}
    assert (job["status"], job["close_reason"]) == ("finished", "finished")
    assert job["items_count"] == TOTAL - len(POISON)
    stats = result.stats
    assert stats["ingest/items/stored"] == TOTAL - len(POISON)
    assert stats["ingest/items/queued"] == TOTAL  # queued, then refused by the database
    assert stats["ingest/items/dead_letter"] == len(POISON)
    assert stats["ingest/dead_letters/stored"] == len(POISON)
    assert "ingest/items/lost" not in stats


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_record_refused_in_the_last_batch_is_still_dead_lettered(
    request: pytest.FixtureRequest, site: LocalSite, tmp_path: Path, backend: str
) -> None:
    # one batch, written only when the spider closes: its dead letter is born during the drain
    db = Database(request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url"))
    db.execute(POSTGRES_ITEMS if backend == "postgres" else SQLITE_ITEMS)
    result = run_crawl(
        {
            "base_url": site.base_url,
            "pages": 1,
            "per_page": 20,
            "poison": [19],
            "settings": {
                "INGEST_DATABASE_URL": db.url,
                "INGEST_BATCH_ROWS": 1000,
                "INGEST_FLUSH_INTERVAL": 60,
            },
        },
        tmp_path,
    )
    result.assert_clean()
    assert sorted(item["data"]["idx"] for item in db.items()) == list(range(19))
    [letter] = db.dead_letters("items")
    assert json.loads(letter["payload"])["idx"] == 19
    assert result.stats["ingest/dead_letters/stored"] == 1
