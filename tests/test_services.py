"""The test services themselves work: a broken fixture would otherwise show up as confusing
failures (or silent skips) all over the suite."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest
from services import as_url, with_database

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.mark.postgres
def test_postgres_dsn_connects(postgres_dsn: str) -> None:
    import psycopg

    assert postgres_dsn.startswith("postgresql://")
    with psycopg.connect(postgres_dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT version()").fetchone()
    assert row is not None
    assert "PostgreSQL" in row[0]


@pytest.mark.postgres
def test_pg_url_is_a_fresh_writable_database(postgres_dsn: str, pg_url: str) -> None:
    import psycopg

    assert pg_url != postgres_dsn
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        conn.execute("CREATE TABLE probe (data jsonb)")
        conn.execute("INSERT INTO probe VALUES (%s::jsonb)", [json.dumps({"a": 1})])
        value = conn.execute("SELECT data->>'a' FROM probe").fetchone()
    assert name is not None
    assert name[0].startswith("t_")
    assert tables == (0,)
    assert value == ("1",)


def test_sqlite_url_points_into_tmp_path(sqlite_url: str, tmp_path: Path) -> None:
    assert sqlite_url == f"sqlite:///{tmp_path}/ingest.sqlite3"


def test_dsn_helpers() -> None:
    url = "postgresql://u:p@127.0.0.1:5433/postgres?sslmode=disable"
    assert with_database(url, "t_1") == "postgresql://u:p@127.0.0.1:5433/t_1?sslmode=disable"
    assert as_url("postgres://u@h:1/d") == "postgresql://u@h:1/d"


def test_dsn_key_value_form_becomes_url() -> None:
    pytest.importorskip("psycopg")
    url = as_url("host=127.0.0.1 port=5433 user=u password='p w' dbname=db")
    assert url == "postgresql://u:p%20w@127.0.0.1:5433/db"


def test_site_items(site: LocalSite) -> None:
    status, content_type, body = _get(site.url("/items?n=25&size=100"))
    assert (status, body) == (200, "25")
    assert content_type.startswith("text/plain")
    assert site.hits == ["/items?n=25&size=100"]


def test_site_pages_link_forward_within_total(site: LocalSite) -> None:
    status, content_type, body = _get(site.url("/page/3?total=5&fanout=3"))
    assert status == 200
    assert content_type.startswith("text/html")
    assert 'href="/page/4?total=5&amp;fanout=3"' in body
    assert "/page/5" not in body  # beyond total


def test_site_whole_site_reachable_from_page_0(site: LocalSite) -> None:
    seen: set[str] = set()
    todo = ["/page/0?total=12&fanout=2"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        body = _get(site.url(path))[2]
        todo += [href.replace("&amp;", "&") for href in re.findall(r'href="([^"]+)"', body)]
    assert {p.split("?")[0] for p in seen} == {f"/page/{k}" for k in range(12)}


def test_site_errors(site: LocalSite) -> None:
    assert _get(site.url("/status/503"))[0] == 503
    assert _get(site.url("/nope"))[0] == 404
    assert _get(site.url("/items?n=-1"))[0] == 400
    assert _get(site.url("/delay?ms=10"))[:3:2] == (200, "ok")
