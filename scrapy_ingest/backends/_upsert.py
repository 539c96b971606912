"""Keyed items (``INGEST_ITEM_KEYS``): their content hash, and what to write for a batch of
them given the rows the database holds for their keys. Every backend upserts as
:func:`plan_upsert` says, in the batch's transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from scrapy_ingest._shapes import Batch

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from scrapy_ingest._shapes import Row
    from scrapy_ingest.schema import TableSpec


@dataclass(frozen=True)
class StoredItem:
    """The current row of one item key, as the database holds it."""

    id: Any
    content_hash: str | None
    version: int
    first_seen_at: float
    #: the whole row, in column order, when the backend read it (ClickHouse, which cannot
    #: update a row in place, writes it again)
    row: Row | None = None


@dataclass
class UpsertPlan:
    """What to write for a batch of keyed items, given the rows stored for their keys."""

    #: rows of keys the database does not hold yet
    inserts: list[Row] = field(default_factory=list)
    #: stored rows that a new version replaces: to the history table first
    archive: list[StoredItem] = field(default_factory=list)
    #: rows of this batch that a later row of the batch replaces: to the history table
    archive_rows: list[Row] = field(default_factory=list)
    #: (stored row, the row that replaces it: same key, next version)
    replaces: list[tuple[StoredItem, Row]] = field(default_factory=list)
    #: (stored row, its new last_seen_at): seen again with the same content
    touches: list[tuple[StoredItem, float]] = field(default_factory=list)
    #: item type -> [new, changed, unchanged], one count per row of the batch
    changes: dict[str, list[int]] = field(default_factory=dict)


def split_keyed(table: TableSpec, rows: Sequence[Row]) -> tuple[Sequence[Row], list[Row]]:
    """*rows* as (rows inserted as they are, keyed items upserted as :func:`plan_upsert`
    says); a batch without keyed items comes back whole, uncopied.

    The keyed rows come back with their content hash: the pipeline leaves it to the writer
    (off the reactor thread), and the row's ``content_hash`` holds the fields the hash
    leaves out until then (see :func:`content_hash`).
    """
    if not table.unique:
        return rows, []
    key_at = table.position("item_key")
    # a packed batch is asked through its packed rows, which have the same key column: its
    # rows are not cut out for that
    plain = rows.packed_rows if isinstance(rows, Batch) else rows
    if all(row[key_at] is None for row in plain):
        return rows, []
    if isinstance(rows, Batch):
        rows = rows.rows()  # cut once
    hash_at = table.position("content_hash")
    return [r for r in rows if r[key_at] is None], [
        _with_hash(r, hash_at) if isinstance(r[hash_at], tuple) else r
        for r in rows
        if r[key_at] is not None
    ]


def content_hash(data: bytes | str, leave_out: tuple[str, ...] = ()) -> str:
    """The content hash of a record: BLAKE2b (128 bits, hex) of its canonical JSON.

    *data* is the record as :meth:`~scrapy_ingest.records.RecordEncoder.encode` gives it
    with ``sort_keys``; *leave_out* names top-level fields the hash ignores
    (``INGEST_HASH_EXCLUDE``), which are taken out and the rest encoded again. orjson reads
    back what it wrote exactly, so the hash is the one of the record encoded without those
    fields in the first place.
    """
    if leave_out:
        fields = orjson.loads(data)
        for name in leave_out:
            del fields[name]
        data = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    elif isinstance(data, str):
        data = data.encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _with_hash(row: Row, hash_at: int) -> Row:
    digest = content_hash(row[-1], row[hash_at])
    return (*row[:hash_at], digest, *row[hash_at + 1 :])


def plan_upsert(
    table: TableSpec, rows: Sequence[Row], stored: Mapping[tuple[str, str], StoredItem]
) -> UpsertPlan:
    """Decide, in the batch's order, what becomes of each keyed item row.

    *stored* holds the current row of each key the database has (read, and locked where
    the database can, in the same transaction as the writes). A row whose content hash is
    that of the current version only moves ``last_seen_at``; one with another hash is the
    next version (``version`` + 1, ``first_seen_at`` kept), and the version it replaces goes
    to the history. Several rows of one key in a batch are versions in their order.

    A batch written again after a failure whose outcome is unknown may be stored already:
    the rows of a key up to the one whose id is the stored row's were applied, and are
    counted unchanged, not applied twice.
    """
    at = table.position
    applied = _applied_rows(table, rows, stored)
    type_at, key_at, hash_at = at("item_type"), at("item_key"), at("content_hash")
    version_at, first_at, last_at = at("version"), at("first_seen_at"), at("last_seen_at")
    plan = UpsertPlan()
    # key -> [the current row (of this batch) or None, the stored row or None, last seen]
    state: dict[tuple[str, str], list[Any]] = {}
    for index, row in enumerate(rows):
        key = (row[type_at], row[key_at])
        counts = plan.changes.setdefault(row[type_at], [0, 0, 0])
        if index <= applied.get(key, -1):
            counts[2] += 1
            continue
        entry = state.get(key)
        if entry is None:
            found = stored.get(key)
            if found is None:
                state[key] = [row, None, row[last_at]]
                counts[0] += 1
                continue
            entry = state[key] = [None, found, None]
        current, found, _ = entry
        current_hash = found.content_hash if current is None else current[hash_at]
        if row[hash_at] == current_hash:
            counts[2] += 1
            if current is None:
                entry[2] = row[last_at]
            else:
                entry[0] = _replace(current, {last_at: row[last_at]})
            continue
        counts[1] += 1
        if current is None:
            plan.archive.append(found)
            version, first_seen = found.version, found.first_seen_at
        else:
            plan.archive_rows.append(current)
            version, first_seen = current[version_at], current[first_at]
        entry[0] = _replace(row, {version_at: version + 1, first_at: first_seen})
        entry[2] = None
    _plan_writes(plan, state.values())
    return plan


def _plan_writes(plan: UpsertPlan, final: Iterable[list[Any]]) -> None:
    """Fill *plan* from the final [row, stored row, last seen] of each key."""
    for current, found, seen in final:
        if current is None:
            if seen is not None:
                plan.touches.append((found, seen))
        elif found is None:
            plan.inserts.append(current)
        else:
            plan.replaces.append((found, current))


def _applied_rows(
    table: TableSpec, rows: Sequence[Row], stored: Mapping[tuple[str, str], StoredItem]
) -> dict[tuple[str, str], int]:
    """Key -> index of the batch row that the stored row is (an earlier write of this batch
    committed), for the keys where there is one."""
    if not stored:
        return {}
    type_at, key_at = table.position("item_type"), table.position("item_key")
    stored_ids = {_id_text(found.id): key for key, found in stored.items()}
    applied = {}
    for index, row in enumerate(rows):
        key = stored_ids.get(_id_text(row[0]))
        if key is not None and key == (row[type_at], row[key_at]):
            applied[key] = index
    return applied


def _id_text(value: Any) -> str:
    # ids come as ints (capture), uuid.UUID or text (with or without dashes) from databases
    return f"{value:032x}" if isinstance(value, int) else str(value).replace("-", "").lower()


def _replace(row: Row, values: Mapping[int, Any]) -> Row:
    changed = list(row)
    for index, value in values.items():
        changed[index] = value
    return tuple(changed)
