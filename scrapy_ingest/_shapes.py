"""The shapes that the writers, the backends and the spill journal pass each other: rows,
batches of them, and what became of a batch, of opening a host and of a replay.

Below every module that uses them (it imports nothing of scrapy_ingest), so that the backends
and the journal, which hand each other rows and outcomes, need not import each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

#: a record as a backend writes it: one value per column of its table, in column order
#: (see :mod:`scrapy_ingest.schema`)
Row = tuple[Any, ...]


@dataclass
class Batch(Sequence[Row]):
    """Rows on their way to a backend.

    With a *payload*, the rows are packed: the last column of each holds the
    offset where its JSON ends in *payload* (see ``BatchWriter.append_json``),
    and :meth:`rows` cuts the JSON out again, off the reactor thread.

    A batch is also a sequence of its rows, cut one at a time when asked for, and a slice
    of it is a batch that shares its payload: a backend that reads the payload itself
    (PostgreSQL's ``COPY``) writes a batch, or the halves of one split to find a refused
    row, without cutting each row out first.
    """

    packed_rows: list[Row]
    payload: bytes | bytearray | memoryview | None = None
    #: where the JSON of the first packed row starts in *payload* (a slice of a batch)
    start: int = 0

    def rows(self, *, text: bool = False) -> list[Row]:
        """The rows, each with its JSON in its last column: as bytes, or with *text* as str.

        As text, the payload is decoded once; when it is ASCII (orjson writes other text as
        UTF-8, so it is not when an item holds such text), byte offsets are character
        offsets, and each row's JSON is a slice of the decoded text.
        """
        payload = self.payload
        if payload is None:
            return self.packed_rows
        if text:
            decoded = str(payload, "utf-8")
            if len(decoded) == len(payload):
                return self._cut(decoded)
        rows = self._cut(bytes(payload))
        if text:
            return [(*row[:-1], row[-1].decode()) for row in rows]
        return rows

    def _cut(self, payload: bytes | str) -> list[Row]:
        rows: list[Row] = []
        start = self.start
        for row in self.packed_rows:
            end = row[-1]
            rows.append((*row[:-1], payload[start:end]))
            start = end
        return rows

    def __len__(self) -> int:
        return len(self.packed_rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows())

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> Batch: ...

    def __getitem__(self, index: int | slice) -> Row | Batch:
        packed = self.packed_rows
        if isinstance(index, slice):
            first, _, step = index.indices(len(packed))
            if step != 1:
                raise ValueError("a batch is sliced with a step of 1 only")
            if self.payload is None:
                return Batch(packed[index])
            return Batch(packed[index], self.payload, self._start_of(first))
        row = packed[index]
        if self.payload is None:
            return row
        position = range(len(packed))[index]
        return (*row[:-1], bytes(self.payload[self._start_of(position) : row[-1]]))

    def _start_of(self, position: int) -> int:
        """Where the JSON of the packed row at *position* starts in the payload."""
        if position <= 0:
            return self.start
        return int(self.packed_rows[min(position, len(self.packed_rows)) - 1][-1])


@dataclass
class WriteOutcome:
    """What became of one batch."""

    written: int = 0
    #: (row, reason) of each record the database refused
    dead: list[tuple[Row, str]] = field(default_factory=list)
    #: on replay, the records of ``dead`` that the dead-letter table refused too (or that have
    #: no dead-letter table), with the reasons: the journal keeps them in a ``refused-*`` file
    dead_refused: list[tuple[Any, str]] = field(default_factory=list)
    #: rows given up on when retries ran out (and no spill journal took them)
    lost: int = 0
    retries: int = 0
    #: the rows not written when retries ran out, in order (to spill them)
    unwritten: list[Row] = field(default_factory=list)
    #: why the last attempt failed, when rows were not written
    failure: str = ""
    #: the database refuses this crawl (a Failure.PERMANENT error): the cause and the fix
    refused: str = ""
    #: rows put in the spill journal, and the bytes of the journal's batches after that
    spilled: int = 0
    journal_bytes: int = 0
    #: the disk under the journal has less than its minimum free space: why (the crawl
    #: takes the journal for full)
    journal_low: str = ""
    #: the journal could not take the rows given up on (``lost``) either: why
    spill_failed: str = ""
    #: spilled batches (of any table) replayed into the database after this one was written
    replayed_batches: int = 0
    replayed_rows: int = 0
    #: keyed items: item type -> [new, changed, unchanged]
    changes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class OpenOutcome:
    """What opening a host found: what it replayed, and why the database is unavailable if it
    is (the host spills until it answers)."""

    replayed: ReplayOutcome | None = None
    unavailable: str | None = None
    journal: str | None = None


@dataclass
class ReplayOutcome:
    """What a replay of the spill journal wrote, set aside, and left for the next one."""

    batches: int = 0
    rows: int = 0
    #: rows (and job rows) the database refused for their content, put in its dead-letter table
    dead_lettered: int = 0
    #: rows refused for their content that the dead-letter table refused too (or that have no
    #: dead-letter table): kept in ``refused-*`` files beside the journal
    kept: int = 0
    #: why rows were set aside (dead-lettered or kept): reason -> rows
    reasons: dict[str, int] = field(default_factory=dict)
    #: batch and job files left in the journal, because the database failed again
    left: int = 0
    #: the replay stopped at a job row or batch the database did not take
    failed: bool = False
    #: the database refuses the replay (a permanent failure, not the content of a row): the
    #: cause and the fix; the batches wait until it is fixed
    refused: str = ""

    @property
    def set_aside(self) -> int:
        """Rows refused for their content: dead-lettered, or kept in ``refused-*`` files."""
        return self.dead_lettered + self.kept
