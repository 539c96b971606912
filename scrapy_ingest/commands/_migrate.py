"""``scrapy ingest migrate``: create or upgrade the tables, or print their DDL for a DBA."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from scrapy_ingest.backends import make_backend
from scrapy_ingest.backends.base import describe_error
from scrapy_ingest.commands._common import databases
from scrapy_ingest.exceptions import IngestError
from scrapy_ingest.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    import argparse

    from scrapy_ingest.commands._common import Context, Database

HELP = "create or upgrade the tables; with --sql, print their DDL for a DBA to run instead"
DESCRIPTION = f"""\
Create the tables a crawl writes in every database the settings name, or bring older ones
to this version's schema ({SCHEMA_VERSION}): missing tables, columns and indexes are added,
and the schema version is recorded, as a crawl with INGEST_CREATE_TABLES = True does when
it starts. Prints each database's schema version before and after.

With --sql, nothing is changed: the statements that create the tables, their indexes and
the schema version row are printed instead, exactly as a crawl would run them on an empty
database, for a DBA to run where crawls have INGEST_CREATE_TABLES = False. Each database's
statements follow a comment line naming it (password hidden), each statement ends with a
line holding ";". PostgreSQL, SQLite and MySQL need no connection for that; ClickHouse is
asked whether it has the JSON type (from ClickHouse 25.3), which decides the type of the
JSON columns.

Exit code 1 when a database could not be migrated (or, with --sql, its DDL not made), else 0."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sql",
        action="store_true",
        help="print the DDL (to standard output) instead of running it",
    )


def run(context: Context) -> int:
    found = databases(context.config)
    if context.opts.sql:
        done = [_print_ddl(database) for database in found]
    else:
        done = [_migrate(database) for database in found]
    return 0 if all(done) else 1


def _print_ddl(database: Database) -> bool:
    try:
        backend = make_backend(database.url, database.tables, create_tables=True)
        statements = backend.create_statements(database.tables)
    except IngestError as exc:
        print(f"{database.shown}: no DDL: {exc}", file=sys.stderr)
        return False
    print(f"-- {database.shown} ({database.source}): scrapy_ingest schema version {SCHEMA_VERSION}")
    for statement in statements:
        print(statement)
        print(";")
    return True


def _migrate(database: Database) -> bool:
    try:
        backend = make_backend(database.url, database.tables, create_tables=True)
        before = backend.schema_version()
        backend.open()
        try:
            after = backend.schema_version()
        finally:
            backend.close()
    except IngestError as exc:
        print(f"{database.shown} ({database.source}): not migrated: {exc}")
        return False
    except Exception as exc:  # the driver's own errors (a DDL statement refused)
        print(f"{database.shown} ({database.source}): not migrated: {describe_error(exc)}")
        return False
    if before is None:
        done = f"tables created, schema version {after}"
    elif before == after:
        done = f"schema version {after}, up to date (missing tables and indexes created)"
    else:
        done = f"schema version {before} -> {after}"
    print(f"{database.shown} ({database.source}): {done}")
    return True
