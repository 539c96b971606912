"""A database that refuses the crawl (docs/reliability.md): a refused password, a missing
database, a role without CREATE or without INSERT stop the crawl before its first request,
with one ERROR naming the cause and the fix; a password changed mid-crawl closes the spider
with ``ingest_backend_refused``, and ``scrapy ingest replay`` with the new password stores
every item once. Against a PostgreSQL of this module's own, with password authentication for
every role but the superuser."""

from __future__ import annotations

import re
import secrets
from contextlib import ExitStack
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import services
from _helpers import (
    Crawl,
    Database,
    assert_refused_at_start,
    errors,
    ingest_command,
    refused_crawl_args,
    run_crawl,
    spilled,
    wait_for,
)
from conftest import service_missing

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from _helpers import CrawlResult
    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.postgres]

#: the superuser's password in its URL (trust auth for it: only the test roles need theirs)
ADMIN_PASSWORD = "refused-admin-pw-7d1"

_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


@pytest.fixture(scope="module")
def admin_url() -> Iterator[str]:
    """The superuser's URL of a fresh database on a server of this module's own, where
    every other role logs in with its password."""
    with ExitStack() as stack:
        try:
            local, url = services.own_postgres(stack, ADMIN_PASSWORD)
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))
        assert local.base is not None
        (local.base / "data" / "pg_hba.conf").write_text(_HBA)
        Database(url).query("SELECT pg_reload_conf()")
        yield url


@pytest.fixture
def db_url(admin_url: str) -> Iterator[str]:
    """The superuser's URL of a fresh database for one test."""
    name = services.create_database(admin_url)
    try:
        yield services.with_database(admin_url, name)
    finally:
        services.drop_database(admin_url, name)


def make_role(admin: str, *grants: str) -> tuple[str, str, str]:
    """A login role with a password and *grants* (``{role}`` stands for its name); its
    name, password and the URL of *admin*'s database with them."""
    name = f"refused_{secrets.token_hex(4)}"
    password = f"pw{secrets.token_hex(8)}"
    statements = [f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"]
    statements += [grant.format(role=name) for grant in grants]
    Database(admin).script(";\n".join(statements))
    return name, password, with_userinfo(admin, name, password)


def retry_waits(result: CrawlResult) -> list[float]:
    """The waits of the retries the crawl announced ('...; retrying in 0.25 s')."""
    return [float(s) for s in re.findall(r"; retrying in ([0-9.]+) s", result.output)]


def with_userinfo(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def test_a_refused_password_stops_the_crawl_before_its_first_request(
    site: LocalSite, db_url: str, tmp_path: Path
) -> None:
    name, password, _ = make_role(db_url, "GRANT ALL ON SCHEMA public TO {role}")
    wrong = with_userinfo(db_url, name, "not-the-password-93e")
    # whatever INGEST_REQUIRE_BACKEND says: no retry heals a refused password
    result = run_crawl(
        refused_crawl_args(site, wrong, tmp_path, INGEST_REQUIRE_BACKEND=False), tmp_path
    )
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [password, "not-the-password-93e"],
        f"refused the password of user '{name}'",
        f"postgresql://{name}:***@",
        "correct the password in the database URL",
    )
    assert retry_waits(result) == [], result.describe()  # no retries


def test_a_missing_database_stops_the_crawl_before_its_first_request(
    site: LocalSite, db_url: str, tmp_path: Path
) -> None:
    _, password, url = make_role(db_url)
    missing = services.with_database(url, "no_such_db_4c1")
    result = run_crawl(refused_crawl_args(site, missing, tmp_path), tmp_path)
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [password],
        "database 'no_such_db_4c1' does not exist",
        "CREATE DATABASE no_such_db_4c1",
    )


def test_a_role_that_may_not_create_tables_stops_the_crawl_before_its_first_request(
    site: LocalSite, db_url: str, tmp_path: Path
) -> None:
    name, password, url = make_role(
        db_url,
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        "GRANT USAGE ON SCHEMA public TO {role}",
        "REVOKE CREATE ON SCHEMA public FROM {role}",
    )
    result = run_crawl(refused_crawl_args(site, url, tmp_path), tmp_path)
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [password],
        f"role '{name}' may not create tables in schema 'public'",
        f"GRANT CREATE ON SCHEMA public TO {name}",
        "INGEST_CREATE_TABLES = False",
        "scrapy ingest migrate --sql",
    )


def test_a_select_only_role_stops_the_crawl_before_its_first_request(
    site: LocalSite, db_url: str, tmp_path: Path
) -> None:
    # the tables are made by another role (here the superuser, by a crawl of its own)
    made = run_crawl(
        refused_crawl_args(site, db_url, tmp_path / "made", pages=1), tmp_path / "made"
    )
    assert made.returncode == 0, made.describe()
    site.reset()
    name, password, url = make_role(
        db_url,
        "GRANT USAGE ON SCHEMA public TO {role}",
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
    )
    result = run_crawl(
        refused_crawl_args(site, url, tmp_path, INGEST_CREATE_TABLES=False), tmp_path
    )
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [password],
        f"role '{name}' may not write the tables of this crawl",
        "GRANT SELECT, INSERT, UPDATE ON ",
        f" TO {name}",
    )
    assert retry_waits(result) == [], result.describe()  # not a minute of retries


def test_a_password_changed_mid_crawl_closes_the_spider_and_replay_stores_everything(
    site: LocalSite, db_url: str, tmp_path: Path
) -> None:
    name, password, url = make_role(db_url, "GRANT ALL ON SCHEMA public TO {role}")
    args = refused_crawl_args(site, url, tmp_path, CONCURRENT_REQUESTS=2, INGEST_RETRY_TIMEOUT=60)
    args.update(pages=150, per_page=20, delay_ms=50)  # a few seconds of pages
    crawl = Crawl(args, tmp_path)
    admin = Database(db_url)
    try:
        wait_for(
            lambda: admin.table_exists("ingest_items") and admin.count("ingest_items"),
            timeout=60,
            what="the first items",
        )
        new_password = f"pw{secrets.token_hex(8)}"
        admin.script(
            f"ALTER ROLE {name} PASSWORD '{new_password}';\n"
            # open connections keep working: end them, so that new ones are needed
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
        )
        result = crawl.wait()
    finally:
        crawl.kill()
    assert result.stats.get("finish_reason") == "ingest_backend_refused", result.describe()
    assert result.returncode != 0, result.describe()
    # the connections ended by the test may be retried once or twice, and then the password
    # is refused: no minute of retries (INGEST_RETRY_TIMEOUT)
    assert sum(retry_waits(result)) < 10, result.describe()
    [error] = errors(result)
    assert f"refused the password of user '{name}'" in error, result.describe()
    assert "scrapy ingest replay" in error, result.describe()
    for secret in (password, new_password):
        assert secret not in result.output, result.describe()
    scraped = result.stats["item_scraped_count"]
    assert scraped < 3000  # the spider stopped early
    assert spilled(tmp_path)

    fixed = with_userinfo(db_url, name, new_password)
    settings = {"INGEST_DATABASE_URL": fixed, "INGEST_SPILL_DIR": tmp_path / "spill"}
    answer = ingest_command(["replay"], settings, tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    ids = [row[0] for row in admin.query("SELECT id FROM ingest_items")]
    assert len(ids) == len(set(ids)) == scraped
    [(status, reason, items_count)] = admin.query(
        "SELECT status, close_reason, items_count FROM ingest_jobs"
    )
    assert (status, reason, items_count) == ("finished", "ingest_backend_refused", scraped)
