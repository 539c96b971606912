"""Record ids, timestamps and the JSON encoder that never loses a whole batch.

Each record is encoded once, when it is captured, with orjson. Values JSON has
no type for are stored as documented in ``docs/tables.md`` ("How values are
stored"):

==========================  ==========================================================
Python value                stored as
==========================  ==========================================================
aware ``datetime``          ISO 8601 string in UTC, ``2024-05-01T12:00:00+00:00``
naive ``datetime``          taken to be UTC, same form
``date`` / ``time``         ISO 8601 string (``time`` keeps its offset, if any)
``timedelta``               number of seconds (float)
``Decimal``                 string, exact (``"NaN"``, ``"Infinity"`` included)
``bytes``, ``bytearray``    base64 string
``set``, ``frozenset``      array (sorted when the members can be sorted)
``tuple``, ``deque``        array
float NaN / ±Infinity       ``null``
int beyond 64 bits          string of its decimal digits
``\\x00`` in a string        U+FFFD (PostgreSQL cannot store NUL)
lone surrogate              U+FFFD
nested item                 object (through ItemAdapter)
``Enum``                    its value
``UUID``, ``Path``          string
non-string dict key         its ``str()``
anything else               the record goes to the dead-letter table
==========================  ==========================================================
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from collections import deque
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import orjson
from itemadapter import ItemAdapter

_UTC = dt.timezone.utc
# orjson's option for non-string keys slows every record: the slow path turns them into str
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_SERIALIZE_NUMPY
_SORTED_OPTIONS = _OPTIONS | orjson.OPT_SORT_KEYS
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_NUL_ESCAPE = b"\\u0000"
_BACKSLASH = ord("\\")


class EncodeError(ValueError):
    """A record holds a value that has no stored form; the message is the reason."""


class RecordEncoder:
    """Encode records to JSON bytes; *on_value(kind)* is called for each converted value.

    The fast path is one ``orjson.dumps`` call. Only records that orjson refuses
    (huge ints, lone surrogates) or whose output has a NUL escape take the slow
    path, which cleans the value tree and encodes again.
    """

    def __init__(self, on_value: Callable[[str], None] | None = None) -> None:
        self._report = on_value or _ignore
        # conversions seen while encoding the current record, reported once it succeeds
        self._seen: list[str] = []
        self._on_value = self._seen.append
        self._default_fn = self._default  # bound once, not per record

    def encode(self, obj: Any, *, sort_keys: bool = False) -> bytes:
        """Return *obj* as JSON bytes, or raise :class:`EncodeError` with the reason.

        With *sort_keys*, object keys are sorted at every level: canonical JSON, the same
        for the same content (for content hashes).
        """
        options = _SORTED_OPTIONS if sort_keys else _OPTIONS
        try:
            out = orjson.dumps(obj, default=self._default_fn, option=options)
            # a backslash first: looking for one byte (an int) is 20x faster than for the escape
            if _BACKSLASH in out and _NUL_ESCAPE in out:
                self._seen.clear()
                out = self._encode_clean(obj, options)
        except (orjson.JSONEncodeError, RecursionError) as exc:
            self._seen.clear()
            if not _is_fixable(exc):
                raise EncodeError(_reason(exc)) from None
            out = self._encode_clean(obj, options)
        if self._seen:
            for kind in self._seen:
                self._report(kind)
            self._seen.clear()
        return out

    def encode_item(self, item: Any) -> bytes:
        """Encode a Scrapy item of any type that ItemAdapter supports."""
        if type(item) is dict:
            return self.encode(item)
        return self.encode(ItemAdapter(item).asdict())

    def _encode_clean(self, obj: Any, options: int) -> bytes:
        try:
            cleaned = self._clean(obj, 0)
            return orjson.dumps(cleaned, default=self._default_fn, option=options)
        except (orjson.JSONEncodeError, RecursionError) as exc:
            self._seen.clear()  # a refused record reports no conversions
            raise EncodeError(_reason(exc)) from None

    def _clean(self, obj: Any, depth: int) -> Any:  # noqa: PLR0911 - one return per kind
        """Copy *obj* with every string and int made storable."""
        if depth > 255:
            raise RecursionError("maximum nesting depth exceeded")
        if isinstance(obj, str):
            return self._clean_str(obj)
        if isinstance(obj, int) and not isinstance(obj, bool):
            if _INT_MIN <= obj <= _INT_MAX:
                return obj
            self._on_value("big_int")
            return str(obj)
        if isinstance(obj, Mapping):
            return {
                self._clean_str(k if isinstance(k, str) else str(k)): self._clean(v, depth + 1)
                for k, v in obj.items()
            }
        if isinstance(obj, (list, tuple, deque)):
            return [self._clean(v, depth + 1) for v in obj]
        if isinstance(obj, (set, frozenset)):
            self._on_value("set")
            return [self._clean(v, depth + 1) for v in _set_items(obj)]
        if not isinstance(obj, type) and ItemAdapter.is_item(obj):
            return self._clean(ItemAdapter(obj).asdict(), depth + 1)
        return obj

    def _clean_str(self, value: str) -> str:
        if "\x00" in value:
            self._on_value("nul")
            value = value.replace("\x00", "\ufffd")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self._on_value("surrogate")
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value

    def _default(self, obj: Any) -> Any:  # noqa: PLR0911 - one branch per documented type
        if isinstance(obj, dt.datetime):
            self._on_value("datetime")
            aware = obj.replace(tzinfo=_UTC) if obj.tzinfo is None else obj.astimezone(_UTC)
            return aware.isoformat()
        if isinstance(obj, (dt.date, dt.time)):
            self._on_value("date")
            return obj.isoformat()
        if isinstance(obj, dt.timedelta):
            self._on_value("timedelta")
            return obj.total_seconds()
        if isinstance(obj, Decimal):
            self._on_value("decimal")
            return str(obj)
        if isinstance(obj, (bytes, bytearray, memoryview)):
            self._on_value("bytes")
            return base64.b64encode(obj).decode("ascii")
        if isinstance(obj, (set, frozenset)):
            self._on_value("set")
            return _set_items(obj)
        if isinstance(obj, deque):
            return list(obj)
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if not isinstance(obj, type) and ItemAdapter.is_item(obj):
            return ItemAdapter(obj).asdict()
        if isinstance(obj, Mapping):
            return dict(obj)
        raise TypeError(f"values of type {type(obj).__qualname__} cannot be stored as JSON")


def _set_items(value: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(value)
    except TypeError:
        return list(value)


def _is_fixable(exc: BaseException) -> bool:
    text = str(exc)
    return "64-bit" in text or "surrogates" in text or "UTF-8" in text or "Dict key" in text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError) or "Recursion" in str(exc):
        return "the record is nested too deeply (or contains itself)"
    cause = exc.__cause__ or exc.__context__
    return str(cause) if isinstance(cause, TypeError) else str(exc)


def _ignore(kind: str) -> None:
    return None
