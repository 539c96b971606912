"""The database router: each kind of record to its own database (INGEST_ROUTES), items routed
by type (rules and INGEST_ROUTER), the job row in every database of the crawl, and clear errors
that name the route."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from _helpers import Database, run_crawl
from scrapy.settings import Settings

from scrapy_ingest.config import IngestConfig
from scrapy_ingest.exceptions import ConfigError
from scrapy_ingest.router import Route, Router, parse_routes

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

from services import free_port

from scrapy_ingest.backends import check_url

pytestmark = pytest.mark.crawl


def _sqlite(tmp_path: Path, name: str) -> Database:
    return Database(f"sqlite:///{tmp_path / name}")


@pytest.mark.postgres
def test_each_kind_goes_to_its_own_database(site: LocalSite, pg_url: str, tmp_path: Path) -> None:
    items, logs = _sqlite(tmp_path, "items.sqlite3"), _sqlite(tmp_path, "logs.sqlite3")
    requests = Database(pg_url)
    default = _sqlite(tmp_path, "default.sqlite3")
    routes = {"items": items.url, "requests": requests.url, "logs": logs.url}
    settings = {"INGEST_DATABASE_URL": default.url, "INGEST_ROUTES": routes}
    result = run_crawl(
        {"base_url": site.base_url, "settings": settings, "pages": 3, "per_page": 4}, tmp_path
    )
    result.assert_clean()
    assert items.count("ingest_items") == 12
    assert requests.count("ingest_requests") == 3
    assert logs.count("ingest_logs") > 0
    # nothing where it was not routed, and the default (which nothing falls through to) unused
    assert not items.table_exists("ingest_requests")
    assert not requests.table_exists("ingest_items")
    assert not logs.table_exists("ingest_items")
    assert not default.sqlite_path.exists()
    # the job row in each database, closed, so that joins on job_id work inside each one
    job_ids = set()
    for db in (items, requests, logs):
        [job] = db.rows("ingest_jobs")
        assert job["status"] == "finished"
        assert job["items_count"] == 12
        assert job["requests_count"] == 3
        job_ids.add(job["job_id"])
    assert len(job_ids) == 1
    assert requests.query(
        "SELECT count(*) FROM ingest_requests r JOIN ingest_jobs j USING (job_id)"
    ) == [(3,)]


@pytest.mark.parametrize(
    "products_db", [pytest.param("pg_url", marks=pytest.mark.postgres), "chdb_url"]
)
def test_a_custom_router_sends_products_to_their_own_table(
    site: LocalSite,
    sqlite_url: str,
    tmp_path: Path,
    products_db: str,
    request: pytest.FixtureRequest,
) -> None:
    products, default = Database(request.getfixturevalue(products_db)), Database(sqlite_url)
    settings = {
        "INGEST_DATABASE_URL": default.url,
        "INGEST_ROUTER": "_crawl_script.ProductRouter",
        "TEST_PRODUCTS_URL": products.url,
    }
    result = run_crawl(
        {
            "base_url": site.base_url,
            "settings": settings,
            "pages": 2,
            "per_page": 10,
            "kind": "mixed",
        },
        tmp_path,
    )
    result.assert_clean()
    stored = products.rows("products")
    assert sorted(row["data"]["idx"] for row in stored) == list(range(0, 20, 2))
    assert {row["item_type"] for row in stored} == {"Product"}
    others = default.rows("ingest_items")
    assert sorted(row["data"]["idx"] for row in others) == list(range(1, 20, 2))
    assert {row["item_type"] for row in others} == {"dict"}
    assert not products.table_exists("ingest_items")
    # requests and logs follow INGEST_DATABASE_URL; the job row is in both databases
    assert default.count("ingest_requests") == 2
    [job] = products.rows("ingest_jobs")
    [default_job] = default.rows("ingest_jobs")
    assert job["job_id"] == default_job["job_id"]
    assert job["status"] == default_job["status"] == "finished"
    assert job["items_count"] == 20
    assert result.stats["ingest/items/stored"] == 20


def test_item_type_rules_route_items_by_class(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    products, default = _sqlite(tmp_path, "products.sqlite3"), Database(sqlite_url)
    rules = [
        {"kind": "items", "item_type": "Product", "url": products.url, "table": "products"},
        {"kind": "items", "spider": "some_other_spider", "url": products.url},
    ]
    settings = {"INGEST_DATABASE_URL": default.url, "INGEST_ROUTES": rules}
    result = run_crawl(
        {
            "base_url": site.base_url,
            "settings": settings,
            "pages": 1,
            "per_page": 6,
            "kind": "mixed",
        },
        tmp_path,
    )
    result.assert_clean()
    assert sorted(r["data"]["idx"] for r in products.rows("products")) == [0, 2, 4]
    assert sorted(r["data"]["idx"] for r in default.rows("ingest_items")) == [1, 3, 5]
    assert not products.table_exists("ingest_items")  # the spider rule is not this spider's


# errors name the route


def test_an_unknown_scheme_names_the_route() -> None:
    with pytest.raises(ConfigError) as info:
        IngestConfig.from_settings(Settings({"INGEST_ROUTES": {"logs": "mongodb://u:pw@h/db"}}))
    message = str(info.value)
    assert message.startswith("INGEST_ROUTES['logs'] ('mongodb://u:***@h/db') is invalid")
    assert "scheme" in message and "Fix:" in message
    assert ":pw@" not in message


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({"pages": "sqlite:///x"}, "INGEST_ROUTES is invalid: the kind 'pages'"),
        ([{"kind": "items"}], "INGEST_ROUTES[0] is invalid: 'kind' and 'url' are required"),
        ([{"kind": "logs", "url": "sqlite:///x", "item_type": "A"}], "only applies to kind"),
        ([{"kind": "items", "url": "sqlite:///x", "tabel": "t"}], "unknown keys ['tabel']"),
        ([{"kind": "items", "url": "sqlite:///x", "table": "Bad-Name"}], "a table name must"),
        ("sqlite:///x", "it must be a dict by kind or a list of rules"),
    ],
)
def test_bad_routes_are_refused_with_the_fix(routes: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_routes(routes, check_url)
    assert expected.replace("INGEST_ROUTES is", "INGEST_ROUTES['pages'] is") in str(
        info.value
    ) or expected in str(info.value)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("require", [True, False])
def test_an_unreachable_database_at_start_names_the_route(
    site: LocalSite, sqlite_url: str, tmp_path: Path, require: bool
) -> None:
    down = f"postgresql://scraper:secretpw@127.0.0.1:{free_port()}/nothing"
    settings = {
        "INGEST_DATABASE_URL": sqlite_url,
        "INGEST_ROUTES": {"requests": down},
        "INGEST_REQUIRE_BACKEND": require,
    }
    result = run_crawl({"base_url": site.base_url, "settings": settings, "pages": 1}, tmp_path)
    assert "secretpw" not in result.output
    if require:  # the crawl does not start
        assert result.returncode != 0 or result.stats.get("finish_reason") != "finished"
        assert "the database of INGEST_ROUTES['requests']" in result.output
        return
    # the crawl goes on; the requests wait in the spill journal, the items are stored
    assert result.stats.get("finish_reason") == "finished", result.describe()
    assert "The database of INGEST_ROUTES['requests'] is unavailable at start" in result.output
    assert result.stats["ingest/requests/spilled"] == 1
    assert result.stats["ingest/items/stored"] == 10


def test_rules_first_match_wins_and_unmatched_records_go_to_the_default() -> None:
    rules = parse_routes(
        [
            {"kind": "items", "item_type": "Product", "url": "sqlite:///p", "table": "products"},
            {"kind": "items", "url": "sqlite:///i"},
            {"kind": "items", "url": "sqlite:///never"},
            {"kind": "logs", "spider": "other", "url": "sqlite:///other"},
        ],
        check_url,
    )
    router = Router(rules, "sqlite:///default", "books")
    assert router.route("items", item_type="Product") == Route("sqlite:///p", "products")
    assert router.route("items", item_type="Book") == Route("sqlite:///i")
    assert router.route("logs") == Route("sqlite:///default")  # the rule is another spider's
    assert router.route("requests") == Route("sqlite:///default")
    assert router.per_item
    assert router.static_urls() == [
        "sqlite:///default",
        "sqlite:///p",
        "sqlite:///i",
        "sqlite:///never",
    ]


def test_items_a_router_sends_to_an_unusable_database_go_to_dead_letters(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    default = Database(sqlite_url)
    down = f"postgresql://scraper:secretpw@127.0.0.1:{free_port()}/nothing"
    settings = {
        "INGEST_DATABASE_URL": default.url,
        "INGEST_ROUTER": "_crawl_script.ProductRouter",
        "TEST_PRODUCTS_URL": down,
        # refused at start, rather than spilled (the default; see test_spill.py)
        "INGEST_REQUIRE_BACKEND": True,
    }
    result = run_crawl(
        {"base_url": site.base_url, "settings": settings, "pages": 2, "per_page": 10,
         "kind": "mixed"},
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert result.stats["finish_reason"] == "finished"
    # the dicts are stored; each Product is kept, with the reason, in the default database
    assert sorted(r["data"]["idx"] for r in default.rows("ingest_items")) == list(range(1, 20, 2))
    dead = default.dead_letters("items")
    assert len(dead) == 10
    assert all("cannot be used" in d["reason"] and "INGEST_ROUTER" in d["reason"] for d in dead)
    assert all("scraper:***@" in d["reason"] for d in dead)
    assert "secretpw" not in result.output
    assert "secretpw" not in repr(dead)
    # one attempt to open it (the first Product's); the others reuse its error
    assert len({d["reason"] for d in dead}) == 1
