"""Shared fixtures: PostgreSQL (``postgres_dsn``, ``pg_url``), SQLite (``sqlite_url``), Redis
(``redis_server_url``) and a local HTTP site (``site``). The service logic lives in
``tests/services.py``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

# No test reaches the internet: Scrapy's cookie middleware asks tldextract whether a cookie's
# domain is a public suffix, and tldextract, on a machine whose cache is cold (CI), downloads
# the Public Suffix List first, then warns (in the crawl's own log) when it cannot. An empty URL
# list makes it use the snapshot it ships with. Crawl subprocesses inherit the variable.
os.environ["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""

# tests/ is not a package; make `services` importable however pytest was started.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from services import (
    LocalSite,
    ServiceUnavailable,
    clickhouse_server,
    create_database,
    create_mysql_database,
    drop_database,
    drop_mysql_database,
    running_site,
    services_required,
    start_mariadb,
    start_postgres,
    start_redis,
    with_database,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_POSTGRES_FIXTURES = {"postgres_dsn", "pg_url"}


def service_missing(reason: str) -> NoReturn:
    """Skip locally; fail in CI (SCRAPY_INGEST_REQUIRE_SERVICES=1), where a skip would hide a
    broken setup behind a green run."""
    if services_required():
        pytest.fail(f"{reason} (required because SCRAPY_INGEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _serve(
    start: Callable[[contextlib.ExitStack], str], missing: Callable[[str], NoReturn]
) -> Iterator[str]:
    """Yield the URL *start* gives (it pushes its cleanup onto the stack); else call
    *missing* with the reason."""
    with contextlib.ExitStack() as stack:
        try:
            url = start(stack)
        except ServiceUnavailable as exc:
            reason = str(exc)
        else:
            yield url
            return
    # Outside the except block, so the report is the reason alone, not a chained traceback.
    missing(reason)


def pytest_configure(config: pytest.Config) -> None:
    # get_crawler() of Scrapy 2.13 needs an installed reactor; crawls run in subprocesses,
    # so the test process only ever builds components
    from scrapy.utils.reactor import install_reactor, is_reactor_installed

    if not is_reactor_installed():
        install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")


@pytest.fixture(autouse=True)
def _machine_to_itself(request: pytest.FixtureRequest) -> Iterator[None]:
    """With ``SCRAPY_INGEST_SUITE_LOCK`` (a file; .ci/run runs two suites side by side), a test
    marked ``exclusive`` (it measures time, memory or gaps) runs while no test of the other suite
    does: it holds the file's lock exclusively, every other test holds it shared."""
    path = os.environ.get("SCRAPY_INGEST_SUITE_LOCK")
    if not path:
        yield
        return
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that use a postgres fixture get the marker automatically, so `-m "not postgres"`
    # never starts a server, even if a test forgot the decorator.
    for item in items:
        if _POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """URL (``postgresql://user:pw@host:port/db``) of a PostgreSQL server for the session.

    Order: env ``SCRAPY_INGEST_TEST_PG_DSN``, testcontainers (if a Docker engine answers),
    then a throwaway local server from ``initdb``/``pg_ctl``, stopped at session end.
    """
    try:
        import psycopg  # noqa: F401  (every consumer needs it; say so before starting a server)
    except ImportError:
        service_missing("psycopg is not installed (pip install -e '.[test]')")
    yield from _serve(lambda stack: start_postgres(stack)[0], service_missing)


@pytest.fixture
def pg_url(postgres_dsn: str) -> Iterator[str]:
    """URL of a fresh, empty database, dropped (WITH FORCE) after the test."""
    name = create_database(postgres_dsn)
    try:
        yield with_database(postgres_dsn, name)
    finally:
        drop_database(postgres_dsn, name)


@pytest.fixture(scope="session")
def _mariadb_server() -> Iterator[str]:
    try:
        import pymysql  # noqa: F401
    except ImportError:
        service_missing("pymysql is not installed (pip install -e '.[test]')")
    yield from _serve(lambda stack: start_mariadb(stack)[0], service_missing)


@pytest.fixture
def mysql_url(_mariadb_server: str) -> Iterator[str]:
    """URL of a fresh, empty database on MariaDB (env ``SCRAPY_INGEST_TEST_MYSQL_URL``, else
    a throwaway local server from Debian's mariadb-server), dropped after the test."""
    name = create_mysql_database(_mariadb_server)
    try:
        yield f"{_mariadb_server.rstrip('/')}/{name}"
    finally:
        drop_mysql_database(_mariadb_server, name)


@pytest.fixture(scope="session")
def maria_server() -> Iterator[str]:
    """The root URL of a local MariaDB that checks passwords and privileges (unlike
    ``mysql_url``'s, started with --skip-grant-tables), for the tests of refused users."""
    try:
        import pymysql  # noqa: F401
    except ImportError:
        service_missing("pymysql is not installed (pip install -e '.[test]')")
    yield from _serve(lambda stack: start_mariadb(stack, grant_tables=True)[0], service_missing)


@pytest.fixture
def maria_db(maria_server: str) -> Iterator[str]:
    """The root URL of a fresh database on ``maria_server``, dropped after the test."""
    name = create_mysql_database(maria_server)
    try:
        yield f"{maria_server}/{name}"
    finally:
        drop_mysql_database(maria_server, name)


@pytest.fixture
def chdb_url(tmp_path: Path) -> str:
    """URL of a fresh chDB data directory: the ClickHouse engine, embedded in the writer
    process (no ClickHouse server can be installed on the CI machine)."""
    import importlib.util

    for module, package in (("chdb", "chdb"), ("clickhouse_connect", "clickhouse-connect")):
        if importlib.util.find_spec(module) is None:
            service_missing(f"{package} is not installed (pip install -e '.[test]')")
    return f"chdb://{tmp_path / 'chdb'}"


@pytest.fixture(scope="session")
def _clickhouse_server() -> Iterator[str]:
    import importlib.util

    if importlib.util.find_spec("clickhouse_connect") is None:
        pytest.skip("clickhouse-connect is not installed")
    # skipped, in CI too: no ClickHouse server can run on the CI machine (its ClickHouse
    # tests use chDB); these tests are for a server given by env or by Docker
    yield from _serve(
        clickhouse_server, lambda reason: pytest.skip(f"no ClickHouse server: {reason}")
    )


@pytest.fixture
def clickhouse_http_url(_clickhouse_server: str) -> Iterator[str]:
    """URL of a fresh database on a real ClickHouse server (``SCRAPY_INGEST_TEST_CH_URL``,
    ``clickhouse://user:pw@host:8123`` without a database, or testcontainers)."""
    import secrets

    import clickhouse_connect

    name = f"t_{secrets.token_hex(6)}"
    admin = clickhouse_connect.get_client(dsn=_clickhouse_server)
    admin.command(f"CREATE DATABASE {name}")
    try:
        yield f"{_clickhouse_server.rstrip('/')}/{name}"
    finally:
        admin.command(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL of a Redis server for the session: env ``SCRAPY_INGEST_TEST_REDIS_URL``, else a
    throwaway local ``redis-server`` on 127.0.0.1 (no persistence), stopped at session end.
    Tests keep to keys of their own (a random prefix), so a shared server is never flushed."""
    try:
        import scrapy_redis  # noqa: F401
    except ImportError:
        service_missing("scrapy-redis is not installed (pip install -e '.[test]')")
    yield from _serve(lambda stack: start_redis(stack)[0], service_missing)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ingest.sqlite3'}"


@pytest.fixture(scope="session")
def _site_server() -> Iterator[LocalSite]:
    with running_site() as site:
        yield site


@pytest.fixture
def site(_site_server: LocalSite) -> LocalSite:
    """The local HTTP test site (see ``services._SiteHandler`` for routes); ``site.url(path)``
    gives absolute URLs and ``site.hits`` lists only this test's requests."""
    _site_server.reset()
    return _site_server
