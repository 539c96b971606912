"""``scrapy ingest check``, run as a user runs it (a subprocess), against real databases.

PostgreSQL and MariaDB are servers of this module's own, with password authentication and
privileges enforced (the session's servers trust everyone), so that a wrong password and a
read-only user fail as they would in production.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import services
from _helpers import Database, ingest_command, item_row
from conftest import service_missing
from scrapy.settings import Settings

from scrapy_ingest.commands._common import databases, open_backend
from scrapy_ingest.config import IngestConfig
from scrapy_ingest.schema import SCHEMA_VERSION, all_tables, table_spec
from scrapy_ingest.spill import SpillJournal

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterator
    from pathlib import Path

ADMIN_PASSWORD = "admin-pw-7f3e"
USER_PASSWORD = "user-pw-c41d"
TABLES = [t.name for t in all_tables("ingest_")]


# servers of this module's own


@pytest.fixture(scope="module")
def pg_server() -> Iterator[tuple[services.LocalPostgres, str]]:
    """A local PostgreSQL that asks for passwords (scram-sha-256 over TCP), and its admin URL."""
    with contextlib.ExitStack() as stack:
        try:
            local, url = services.own_postgres(stack, ADMIN_PASSWORD)
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))
        Database(url).execute(f"ALTER ROLE postgres PASSWORD '{ADMIN_PASSWORD}'")
        assert local.base is not None
        hba = local.base / "data" / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        hba.write_text(
            "\n".join(
                line.replace("trust", "scram-sha-256") if line.startswith("host") else line
                for line in lines
            )
            + "\n"
        )
        Database(url).execute("SELECT pg_reload_conf()")
        yield local, url


@pytest.fixture
def pg_db(pg_server: tuple[services.LocalPostgres, str]) -> Iterator[str]:
    """Admin URL of a fresh database on the module's PostgreSQL."""
    admin = pg_server[1]
    name = services.create_database(admin)
    try:
        yield services.with_database(admin, name)
    finally:
        services.drop_database(admin, name)


# users with fewer rights


def pg_user(admin_url: str, grants: str) -> str:
    """A login role with USER_PASSWORD, granted *grants* (``{role}`` and ``{db}`` filled in);
    its URL. Dropped with the database's server."""
    name = f"u_{os.urandom(4).hex()}"
    db = urlsplit(admin_url).path.lstrip("/")
    Database(admin_url).script(
        f"CREATE ROLE {name} LOGIN PASSWORD '{USER_PASSWORD}';\n" + grants.format(role=name, db=db)
    )
    return with_user(admin_url, name, USER_PASSWORD)


def maria_user(admin_url: str, grants: str) -> str:
    name = f"u_{os.urandom(4).hex()}"
    db = urlsplit(admin_url).path.lstrip("/")
    Database(admin_url).script(
        f"CREATE USER '{name}'@'%' IDENTIFIED BY '{USER_PASSWORD}';\n"
        + grants.format(role=f"'{name}'@'%'", db=db)
    )
    return with_user(admin_url, name, USER_PASSWORD)


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


# helpers


def create_tables(url: str) -> None:
    """Create every table a crawl with *url* writes, as a crawl would."""
    config = IngestConfig.from_settings(Settings({"INGEST_DATABASE_URL": url}))
    for database in databases(config):
        open_backend(database, create_tables=True).close()


def check(url: str, tmp_path: Path, **settings: Any) -> subprocess.CompletedProcess[str]:
    settings = {"INGEST_DATABASE_URL": url, "INGEST_SPILL_DIR": str(tmp_path / "spill"), **settings}
    return ingest_command(["check"], settings, tmp_path)


def output_of(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout + done.stderr


def assert_fails(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    output = output_of(done)
    assert done.returncode == 1, output
    for text in expected:
        assert text in output, output
    for secret in (USER_PASSWORD, ADMIN_PASSWORD, "wrong-pw"):
        assert secret not in output, output
    return output


def tables_of(url: str) -> list[str]:
    db = Database(url)
    return [name for name in TABLES if db.table_exists(name)]


def sqlite_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'ingest.sqlite3'}"


def chdb_db(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'chdb'}"


@pytest.fixture(params=["sqlite", "postgres", "mariadb", "chdb"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind, the admin's URL."""
    if request.param == "postgres":
        request.applymarker(pytest.mark.postgres)
        return str(request.getfixturevalue("pg_db"))
    if request.param == "mariadb":
        return str(request.getfixturevalue("maria_db"))
    if request.param == "chdb":
        request.getfixturevalue("chdb_url")  # skips without chDB
        return chdb_db(tmp_path)
    (tmp_path / "data").mkdir()
    return sqlite_db(tmp_path)


# what passes


def test_a_healthy_database_passes(any_db: str, tmp_path: Path) -> None:
    create_tables(any_db)
    done = check(any_db, tmp_path)
    output = output_of(done)
    assert done.returncode == 0, output
    assert f"schema version {SCHEMA_VERSION}: OK" in output, output
    assert "1 database(s) OK: a crawl would store everything" in output
    assert ADMIN_PASSWORD not in output


def test_an_empty_database_passes_and_is_left_as_it_was(any_db: str, tmp_path: Path) -> None:
    done = check(any_db, tmp_path)
    output = output_of(done)
    assert done.returncode == 0, output
    assert "no tables yet (a crawl creates them): OK" in output, output
    if any_db.startswith("sqlite"):
        assert list((tmp_path / "data").iterdir()) == []  # not even an empty file
    elif any_db.startswith("chdb"):
        assert not (tmp_path / "chdb").exists()  # not even its data directory
    else:
        assert tables_of(any_db) == []


# what fails


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_missing_tables_fail_when_they_may_not_be_created(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_db") if kind == "postgres" else sqlite_db(tmp_path)
    if kind == "sqlite":
        (tmp_path / "data").mkdir()
    done = check(url, tmp_path, INGEST_CREATE_TABLES=False)
    assert_fails(done, "ingest_items", "INGEST_CREATE_TABLES is False", "scrapy ingest migrate")
    assert tables_of(url) == []


@pytest.mark.postgres
def test_a_stopped_postgresql_fails(
    pg_server: tuple[services.LocalPostgres, str], pg_db: str, tmp_path: Path
) -> None:
    create_tables(pg_db)
    local = pg_server[0]
    local.pause()
    try:
        done = check(pg_db, tmp_path)
    finally:
        local.resume()
    assert_fails(done, "cannot connect to PostgreSQL", "Fix: start the database server")


def test_a_mariadb_where_nothing_listens_fails(tmp_path: Path) -> None:
    url = f"mysql+pymysql://root:{ADMIN_PASSWORD}@127.0.0.1:{services.free_port()}/shop"
    done = check(url, tmp_path)
    assert_fails(done, "Can't connect", "Fix: start the database server", "INGEST_DATABASE_URL")


@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "mariadb"])
def test_a_wrong_password_fails(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    admin = request.getfixturevalue("pg_db" if kind == "postgres" else "maria_db")
    make_user = pg_user if kind == "postgres" else maria_user
    url = make_user(admin, "")
    user = urlsplit(url).username
    assert user is not None
    done = check(with_user(url, user, "wrong-pw"), tmp_path)
    assert_fails(done, "Fix: correct the user name and password in INGEST_DATABASE_URL")


READ_ONLY = {
    "postgres": "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
    "mariadb": "GRANT SELECT ON `{db}`.* TO {role}",
}


@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "mariadb"])
def test_a_read_only_user_fails(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    admin = request.getfixturevalue("pg_db" if kind == "postgres" else "maria_db")
    create_tables(admin)
    url = (pg_user if kind == "postgres" else maria_user)(admin, READ_ONLY[kind])
    done = check(url, tmp_path, INGEST_CREATE_TABLES=False)
    output = assert_fails(done, "may not INSERT or UPDATE", "GRANT SELECT, INSERT, UPDATE ON")
    assert f"schema version {SCHEMA_VERSION}: 1 problem(s)" in output
    assert Database(admin).count("ingest_jobs") == 0


WRITER = {
    "postgres": "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role};\n"
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    "mariadb": "GRANT SELECT, INSERT, UPDATE ON `{db}`.* TO {role}",
}


@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "mariadb"])
def test_a_user_that_may_write_but_not_create_tables_needs_create_tables_false(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each crawl runs CREATE TABLE/INDEX IF NOT EXISTS when INGEST_CREATE_TABLES is True,
    which such a user may not even where the tables exist."""
    admin = request.getfixturevalue("pg_db" if kind == "postgres" else "maria_db")
    create_tables(admin)
    url = (pg_user if kind == "postgres" else maria_user)(admin, WRITER[kind])
    done = check(url, tmp_path)
    assert_fails(done, "INGEST_CREATE_TABLES = True", "Fix: ", "INGEST_CREATE_TABLES = False")
    # what check said: a crawl would fail to open the database
    config = IngestConfig.from_settings(Settings({"INGEST_DATABASE_URL": url}))
    with pytest.raises(Exception, match=r"denied|must be owner|may not create"):
        open_backend(databases(config)[0], create_tables=True)
    done = check(url, tmp_path, INGEST_CREATE_TABLES=False)
    assert done.returncode == 0, output_of(done)
    assert USER_PASSWORD not in output_of(done)


def test_batches_waiting_in_the_spill_journal_fail(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    url = sqlite_db(tmp_path)
    create_tables(url)
    items = table_spec("items", "ingest_")
    row = item_row(1, "job", "spider", "Item", "https://example.com", time.time(), b"{}")
    SpillJournal(tmp_path / "spill", url).spill(items, [row])
    other = "postgresql://shop:secret-pw-9@db.example/shop"
    SpillJournal(tmp_path / "spill", other).spill(items, [row])
    output = assert_fails(
        check(url, tmp_path),
        "1 spilled batches wait in the spill journal",
        "Fix: scrapy ingest replay",
        "postgresql://shop:***@db.example/shop (not named by the settings)",
        "scrapy ingest replay --url",
    )
    assert "secret-pw-9" not in output
    assert f"(INGEST_DATABASE_URL): schema version {SCHEMA_VERSION}: 1 problem(s)" in output
    assert "2 of 2 database(s) with problems" in output


@pytest.mark.parametrize("under_scrapyd", [True, False])
def test_a_relative_sqlite_path_under_scrapyd_gets_a_warning(
    under_scrapyd: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if under_scrapyd:
        monkeypatch.setenv("SCRAPY_JOB", "5f1c0e3a")
    else:
        monkeypatch.delenv("SCRAPY_JOB", raising=False)
    done = check("sqlite:///ingest.sqlite3", tmp_path)
    output = output_of(done)
    assert done.returncode == 0, output  # a warning: the crawl stores everything, elsewhere
    warned = "relative path, and SCRAPY_JOB is set (scrapyd)" in output
    assert warned is under_scrapyd, output
    if under_scrapyd:
        assert "Fix: an absolute path" in output
