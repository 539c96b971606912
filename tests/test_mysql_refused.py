"""MariaDB and SQLite databases that refuse the crawl (docs/reliability.md), and MariaDB's
packet limit (docs/backends.md).

A refused password, a missing database, a user without CREATE and a SELECT-only user stop the
crawl before its first request with one ERROR naming the cause and the fix, nothing spilled;
a server where nothing listens is an outage (the crawl starts and spills). A row over
``max_allowed_packet`` is dead-lettered before it is sent, and the rest of the crawl is
stored. Against a MariaDB of this module's own that checks passwords and grants (the
session's trusts everyone), and SQLite files.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import services
from _helpers import Database, assert_refused_at_start, refused_crawl_args, run_crawl, spilled

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl]

#: the size of the items that MariaDB's default max_allowed_packet (16 MiB) cannot take
LARGE_ITEM_BYTES = 20_000_000


class InflatePipeline:
    """Before ours: the items whose ``idx`` is in the setting ``TEST_INFLATE_IDX`` get a field
    of LARGE_ITEM_BYTES characters (run in the crawl's process: ``_crawl_script.py`` has this
    directory on its path)."""

    def __init__(self, indexes: list[int]) -> None:
        self.indexes = set(indexes)

    @classmethod
    def from_crawler(cls, crawler: Any) -> InflatePipeline:
        return cls(crawler.settings.getlist("TEST_INFLATE_IDX"))

    def process_item(self, item: Any, spider: Any = None) -> Any:
        if item["idx"] in self.indexes:
            item["blob"] = "x" * LARGE_ITEM_BYTES
        return item


# a MariaDB of this module's own, with grant tables


def maria_user(db_url: str, *grants: str) -> tuple[str, str, str]:
    """A user with a password and *grants* (``{user}`` and ``{db}`` filled in): its name,
    password and the URL of *db_url*'s database with them."""
    name = f"u_{secrets.token_hex(4)}"
    password = f"pw{secrets.token_hex(8)}"
    db = urlsplit(db_url).path.lstrip("/")
    user = f"'{name}'@'%'"
    statements = [f"CREATE USER {user} IDENTIFIED BY '{password}'"]
    statements += [grant.format(user=user, db=db) for grant in grants]
    Database(db_url).script(";\n".join(statements))
    return name, password, with_user(db_url, name, password)


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


# crawls


# MariaDB: refused at start


def test_a_refused_password_stops_the_crawl_before_its_first_request(
    site: LocalSite, maria_db: str, tmp_path: Path
) -> None:
    name, password, _ = maria_user(maria_db, "GRANT ALL ON `{db}`.* TO {user}")
    wrong = with_user(maria_db, name, "not-the-password-5b2")
    # whatever INGEST_REQUIRE_BACKEND says: no retry heals a refused password
    args = refused_crawl_args(site, wrong, tmp_path, INGEST_REQUIRE_BACKEND=False)
    result = run_crawl(args, tmp_path)
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [password, "not-the-password-5b2"],
        f"refused the login of user '{name}'",
        f"mysql://{name}:***@",
        "correct the user or password in the database URL",
    )


@pytest.mark.parametrize("who", ["user", "root"])
def test_a_missing_database_stops_the_crawl_before_its_first_request(
    who: str, site: LocalSite, maria_db: str, tmp_path: Path
) -> None:
    # a user with rights on one database is denied another (1044); root is told it is
    # unknown (1049)
    _, password, url = maria_user(maria_db, "GRANT ALL ON `{db}`.* TO {user}")
    missing = with_database(url if who == "user" else maria_db, "no_such_db_4c1")
    result = run_crawl(refused_crawl_args(site, missing, tmp_path), tmp_path)
    expected = (
        ["may not use database 'no_such_db_4c1'", "or it does not exist"]
        if who == "user"
        else ["database 'no_such_db_4c1' does not exist"]
    )
    assert_refused_at_start(
        result, site, tmp_path, [password], *expected, "CREATE DATABASE `no_such_db_4c1`"
    )


def test_a_user_that_may_not_create_tables_stops_the_crawl_before_its_first_request(
    site: LocalSite, maria_db: str, tmp_path: Path
) -> None:
    name, password, url = maria_user(
        maria_db, "GRANT SELECT, INSERT, UPDATE, DELETE ON `{db}`.* TO {user}"
    )
    result = run_crawl(refused_crawl_args(site, url, tmp_path), tmp_path)
    db = urlsplit(maria_db).path.lstrip("/")
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [password],
        f"user '{name}' may not create the tables of this crawl in database '{db}'",
        f"GRANT CREATE, INDEX, ALTER ON `{db}`.* TO '{name}'@'%'",
        "INGEST_CREATE_TABLES = False",
        "scrapy ingest migrate --sql",
    )


def test_a_select_only_user_stops_the_crawl_before_its_first_request(
    site: LocalSite, maria_db: str, tmp_path: Path
) -> None:
    # the tables are made by another user (here root, by a crawl of its own)
    made = run_crawl(
        refused_crawl_args(site, maria_db, tmp_path / "made", pages=1), tmp_path / "made"
    )
    assert made.returncode == 0, made.describe()
    site.reset()
    name, password, url = maria_user(maria_db, "GRANT SELECT ON `{db}`.* TO {user}")
    args = refused_crawl_args(site, url, tmp_path, INGEST_CREATE_TABLES=False)
    result = run_crawl(args, tmp_path)
    db = urlsplit(maria_db).path.lstrip("/")
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [password],
        f"user '{name}' may not write the tables of this crawl in database '{db}'",
        f"GRANT SELECT, INSERT, UPDATE ON `{db}`.* TO '{name}'@'%'",
    )


def test_a_server_where_nothing_listens_is_an_outage_the_crawl_starts_and_spills(
    site: LocalSite, tmp_path: Path
) -> None:
    url = f"mysql+pymysql://scraper:secret-pw-91@127.0.0.1:{services.free_port()}/scraping"
    result = run_crawl(refused_crawl_args(site, url, tmp_path, pages=2), tmp_path)
    assert result.returncode == 0, result.describe()
    assert result.stats.get("finish_reason") == "finished", result.describe()
    assert result.stats.get("item_scraped_count") == 40, result.describe()
    assert result.stats.get("ingest/items/spilled") == 40, result.describe()
    assert spilled(tmp_path)
    assert "secret-pw-91" not in result.output


# MariaDB: the packet limit


def test_items_over_the_packet_limit_are_dead_lettered_and_the_rest_stored(
    site: LocalSite, maria_db: str, tmp_path: Path
) -> None:
    [(limit,)] = Database(maria_db).query("SELECT @@max_allowed_packet")
    assert limit == 16 * 1024 * 1024  # MariaDB's default
    large = [7, 1500]
    args = refused_crawl_args(
        site,
        maria_db,
        tmp_path,
        ITEM_PIPELINES={f"{__name__}.InflatePipeline": 100},
        TEST_INFLATE_IDX=large,
    )
    args.update(pages=20, per_page=100)
    result = run_crawl(args, tmp_path)
    assert result.returncode == 0, result.describe()
    assert result.stats.get("finish_reason") == "finished", result.describe()
    assert result.stats["item_scraped_count"] == 2000, result.describe()
    assert result.stats.get("ingest/items/stored") == 1998, result.describe()
    assert result.stats.get("ingest/items/dead_letter") == 2, result.describe()
    assert not result.stats.get("ingest/items/spilled"), result.describe()
    assert not spilled(tmp_path), result.describe()

    db = Database(maria_db)
    stored = {row[0] for row in db.query("SELECT JSON_VALUE(data, '$.idx') FROM ingest_items")}
    assert stored == {str(i) for i in range(2000) if i not in large}
    letters = db.query("SELECT kind, reason, LENGTH(payload) FROM ingest_dead_letters")
    assert len(letters) == 2, (letters, result.describe())
    for kind, reason, length in letters:
        assert kind == "items"
        for text in ("max_allowed_packet = 16,777,216 bytes", "SET GLOBAL max_allowed_packet"):
            assert text in reason, reason
        assert re.search(r"the row takes 20,0\d\d,\d\d\d bytes", reason), reason
        assert 60_000 < length <= 65_535  # cut to what its TEXT column holds
    # the job row counts the items stored, not those set aside
    [(status, items_count)] = db.query("SELECT status, items_count FROM ingest_jobs")
    assert (status, items_count) == ("finished", 1998)


def test_under_a_small_packet_limit_batches_are_cut_and_a_dead_letter_fits(
    site: LocalSite, maria_server: str, tmp_path: Path
) -> None:
    """A server whose limit (512 KiB) is below PyMySQL's own statement size (about 1 MB) and
    the dead letter's payload (1,000,000 characters, in a LONGTEXT column here): each INSERT
    stays under it, and the payload is cut further."""
    name = services.create_mysql_database(maria_server)
    admin = Database(maria_server)
    try:
        url = f"{maria_server}/{name}"
        made = run_crawl(
            refused_crawl_args(site, url, tmp_path / "made", pages=1), tmp_path / "made"
        )
        assert made.returncode == 0, made.describe()
        Database(url).script("ALTER TABLE ingest_dead_letters MODIFY payload LONGTEXT")
        admin.script("SET GLOBAL max_allowed_packet = 524288")
        args = refused_crawl_args(
            site,
            url,
            tmp_path,
            pages=4,
            ITEM_PIPELINES={f"{__name__}.InflatePipeline": 100},
            TEST_INFLATE_IDX=[3],
        )
        args.update(per_page=50, size=100_000)  # 5 MB of items per page
        result = run_crawl(args, tmp_path)
        assert result.returncode == 0, result.describe()
        assert result.stats.get("ingest/items/stored") == 199, result.describe()
        assert not spilled(tmp_path), result.describe()
        [(reason, payload)] = Database(url).query("SELECT reason, payload FROM ingest_dead_letters")
        assert "max_allowed_packet = 524,288 bytes" in reason, reason
        assert payload.endswith("...[truncated to fit the database]")
        assert 400_000 < len(payload) < 524_288
    finally:
        admin.script("SET GLOBAL max_allowed_packet = 16777216")
        services.drop_mysql_database(maria_server, name)


# SQLite


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """*path* not writable by this process, as a file of another user is: made immutable
    (``chattr +i``) when running as root, whom file modes do not stop; else ``chmod a-w``."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.fail(
            "chattr is needed to make a file read-only for root (apt-get install e2fsprogs)"
        )
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"chattr +i failed on this file system: {done.stderr}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def test_a_read_only_sqlite_file_stops_the_crawl_before_its_first_request(
    site: LocalSite, tmp_path: Path
) -> None:
    path = tmp_path / "db" / "ingest.sqlite3"
    path.parent.mkdir()
    url = f"sqlite:///{path}"
    made = run_crawl(refused_crawl_args(site, url, tmp_path / "made", pages=1), tmp_path / "made")
    assert made.returncode == 0, made.describe()
    site.reset()
    with read_only(path):
        result = run_crawl(refused_crawl_args(site, url, tmp_path), tmp_path)
    assert_refused_at_start(
        result,
        site,
        tmp_path,
        [],
        f"the SQLite file {path} is read-only for this process",
        "attempt to write a readonly database",
        "writable by the user running the crawl",
    )


def test_an_absolute_sqlite_path_in_a_missing_directory_is_created(
    site: LocalSite, tmp_path: Path
) -> None:
    path = tmp_path / "not" / "there" / "yet" / "ingest.sqlite3"
    url = f"sqlite:///{path}"
    result = run_crawl(refused_crawl_args(site, url, tmp_path, pages=2), tmp_path / "work")
    result.assert_clean()
    assert Database(url).count("ingest_items") == 40
    assert not spilled(tmp_path)


def test_a_sqlite_path_in_a_missing_directory_without_create_tables_is_refused(
    site: LocalSite, tmp_path: Path
) -> None:
    path = tmp_path / "not" / "there" / "ingest.sqlite3"
    args = refused_crawl_args(site, f"sqlite:///{path}", tmp_path, INGEST_CREATE_TABLES=False)
    result = run_crawl(args, tmp_path)
    assert_refused_at_start(
        result, site, tmp_path, [], f"SQLite cannot open the file {path}", "unable to open"
    )
    assert not path.parent.exists()
