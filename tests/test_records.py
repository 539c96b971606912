"""RecordEncoder stores every awkward value the way records.py documents it (or refuses the
record with a reason); IdFactory makes UUIDv7 ids; TimestampFormatter writes UTC timestamps."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import time
import uuid
from collections import deque
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any

import attrs
import orjson
import pytest
import scrapy

from scrapy_ingest._ids import IdFactory, format_uuid
from scrapy_ingest._time import TimestampFormatter
from scrapy_ingest.records import EncodeError, RecordEncoder

UTC = dt.timezone.utc
PLUS_2 = dt.timezone(dt.timedelta(hours=2))


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Product(scrapy.Item):
    name = scrapy.Field()
    price = scrapy.Field()
    seen = scrapy.Field()


@dataclasses.dataclass
class DataclassProduct:
    name: str
    price: Decimal
    seen: dt.datetime


@attrs.define
class AttrsProduct:
    name: str
    price: Decimal
    seen: dt.datetime


class Unstorable:
    """An arbitrary object: no stored form exists for it."""


class _Counter:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def __call__(self, kind: str) -> None:
        self.kinds.append(kind)


def _encode(value: Any) -> tuple[Any, list[str]]:
    """Encode ``{"v": value}``; return the decoded stored value and the reported kinds."""
    counter = _Counter()
    out = RecordEncoder(on_value=counter).encode({"v": value})
    assert isinstance(out, bytes)
    return orjson.loads(out)["v"], counter.kinds


# (id, value, stored form, conversions reported)
AWKWARD: list[tuple[str, Any, Any, list[str]]] = [
    (
        "aware-datetime",
        dt.datetime(2024, 5, 1, 14, 0, tzinfo=PLUS_2),
        "2024-05-01T12:00:00+00:00",
        ["datetime"],
    ),
    (
        "utc-datetime",
        dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "2024-05-01T12:00:00+00:00",
        ["datetime"],
    ),
    ("naive-datetime", dt.datetime(2024, 5, 1, 12, 0), "2024-05-01T12:00:00+00:00", ["datetime"]),
    (
        "datetime-micros",
        dt.datetime(2024, 5, 1, 12, 0, 0, 123456),
        "2024-05-01T12:00:00.123456+00:00",
        ["datetime"],
    ),
    ("date", dt.date(2024, 5, 1), "2024-05-01", ["date"]),
    ("naive-time", dt.time(12, 30, 15), "12:30:15", ["date"]),
    ("aware-time-keeps-offset", dt.time(12, 30, tzinfo=PLUS_2), "12:30:00+02:00", ["date"]),
    ("timedelta", dt.timedelta(minutes=1, seconds=30, milliseconds=500), 90.5, ["timedelta"]),
    ("decimal-exact", Decimal("1.10"), "1.10", ["decimal"]),
    (
        "decimal-long",
        Decimal("0.1000000000000000000000000001"),
        "0.1000000000000000000000000001",
        ["decimal"],
    ),
    ("decimal-nan", Decimal("NaN"), "NaN", ["decimal"]),
    ("decimal-infinity", Decimal("Infinity"), "Infinity", ["decimal"]),
    ("decimal-minus-infinity", Decimal("-Infinity"), "-Infinity", ["decimal"]),
    ("bytes", b"\x00\xffhi", "AP9oaQ==", ["bytes"]),
    ("bytearray", bytearray(b"ab"), "YWI=", ["bytes"]),
    ("set-sorted", {3, 1, 2}, [1, 2, 3], ["set"]),
    ("frozenset-sorted", frozenset({"b", "c", "a"}), ["a", "b", "c"], ["set"]),
    ("tuple", (1, "a", None), [1, "a", None], []),
    ("nested-tuple", ((1, 2), (3,)), [[1, 2], [3]], []),
    ("deque", deque([1, 2]), [1, 2], []),
    ("float-nan", math.nan, None, []),
    ("float-infinity", math.inf, None, []),
    ("float-minus-infinity", -math.inf, None, []),
    ("int-64-bit-max", 2**64 - 1, 2**64 - 1, []),
    ("int-64-bit-min", -(2**63), -(2**63), []),
    ("int-beyond-64-bits", 2**64, "18446744073709551616", ["big_int"]),
    ("int-beyond-64-bits-negative", -(2**70), "-1180591620717411303424", ["big_int"]),
    ("nul", "a\x00b\x00", "a\ufffdb\ufffd", ["nul"]),
    ("lone-high-surrogate", "x\ud800y", "x\ufffdy", ["surrogate"]),
    ("lone-low-surrogate", "\udfff", "\ufffd", ["surrogate"]),
    ("enum", Color.RED, "red", []),
    ("int-enum", Level.HIGH, 3, []),
    ("path", PurePosixPath("/data/x.html"), "/data/x.html", []),
    ("uuid", uuid.UUID(int=5), "00000000-0000-0000-0000-000000000005", []),
    # non-string dict keys: their str()
    ("non-str-keys", {1: "a", 2.5: "b", None: "c"}, {"1": "a", "2.5": "b", "None": "c"}, []),
    ("bool-key", {False: "x"}, {"False": "x"}, []),
    ("date-key", {dt.date(2024, 5, 1): 1}, {"2024-05-01": 1}, []),
    ("uuid-key", {uuid.UUID(int=1): 1}, {"00000000-0000-0000-0000-000000000001": 1}, []),
    ("enum-key", {Color.RED: 1}, {"Color.RED": 1}, []),
    ("tuple-key", {(1, 2): "t"}, {"(1, 2)": "t"}, []),
    ("decimal-key", {Decimal("1.5"): 1}, {"1.5": 1}, []),
    ("nested-non-str-key", [{1: {2: Decimal("3")}}], [{"1": {"2": "3"}}], ["decimal"]),
    ("nul-in-key", {"k\x00": 1}, {"k\ufffd": 1}, ["nul"]),
    ("surrogate-in-key", {"k\ud800": 1}, {"k\ufffd": 1}, ["surrogate"]),
    ("big-int-in-list", [1, 2**65], [1, "36893488147419103232"], ["big_int"]),
    (
        "plain",
        {"title": "ok", "n": [1, 2.5, True, None]},
        {"title": "ok", "n": [1, 2.5, True, None]},
        [],
    ),
]


@pytest.mark.parametrize(
    ("value", "stored", "kinds"), [a[1:] for a in AWKWARD], ids=[a[0] for a in AWKWARD]
)
def test_awkward_value_is_stored_as_documented(value: Any, stored: Any, kinds: list[str]) -> None:
    result, reported = _encode(value)
    assert result == stored
    assert type(result) is type(stored)
    assert reported == kinds


def test_huge_string_is_kept_whole() -> None:
    text = "é" * 1_000_000
    result, reported = _encode(text)
    assert result == text
    assert reported == []


@pytest.mark.parametrize(
    "nested",
    [
        Product(name="pen", price=Decimal("2.50"), seen=dt.datetime(2024, 5, 1, 12)),
        DataclassProduct("pen", Decimal("2.50"), dt.datetime(2024, 5, 1, 12)),
        AttrsProduct("pen", Decimal("2.50"), dt.datetime(2024, 5, 1, 12)),
    ],
    ids=["scrapy.Item", "dataclass", "attrs"],
)
def test_nested_item_is_stored_as_object(nested: Any) -> None:
    result, reported = _encode([nested])
    assert result == [{"name": "pen", "price": "2.50", "seen": "2024-05-01T12:00:00+00:00"}]
    assert sorted(reported) == ["datetime", "decimal"]


@pytest.mark.parametrize(
    "nested",
    [
        Product(name="x\ud800", price=2**70, seen={3, 1}),
        DataclassProduct("x\ud800", 2**70, {3, 1}),  # type: ignore[arg-type]
        AttrsProduct("x\ud800", 2**70, {3, 1}),  # type: ignore[arg-type]
    ],
    ids=["scrapy.Item", "dataclass", "attrs"],
)
def test_nested_item_on_slow_path(nested: Any) -> None:
    result, _ = _encode({"inner": nested})
    assert result == {
        "inner": {"name": "x\ufffd", "price": "1180591620717411303424", "seen": [1, 3]}
    }


@pytest.mark.parametrize(
    "item",
    [
        {"name": "pen", "price": Decimal("2.50"), "seen": dt.datetime(2024, 5, 1, 12)},
        Product(name="pen", price=Decimal("2.50"), seen=dt.datetime(2024, 5, 1, 12)),
        DataclassProduct("pen", Decimal("2.50"), dt.datetime(2024, 5, 1, 12)),
        AttrsProduct("pen", Decimal("2.50"), dt.datetime(2024, 5, 1, 12)),
    ],
    ids=["dict", "scrapy.Item", "dataclass", "attrs"],
)
def test_encode_item_of_every_item_type(item: Any) -> None:
    counter = _Counter()
    out = RecordEncoder(on_value=counter).encode_item(item)
    assert orjson.loads(out) == {
        "name": "pen",
        "price": "2.50",
        "seen": "2024-05-01T12:00:00+00:00",
    }
    assert sorted(counter.kinds) == ["datetime", "decimal"]


def test_output_is_valid_utf8_without_nul() -> None:
    out = RecordEncoder().encode({"a": "\x00", "b": "\ud800", "c\x00": [2**80]})
    out.decode("utf-8")  # strict: raises on anything PostgreSQL would refuse
    assert b"\\u0000" not in out
    assert b"\x00" not in out


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (Unstorable(), "Unstorable"),
        (object(), "object"),
        (1 + 2j, "complex"),
        (len, "builtin_function_or_method"),
    ],
    ids=["custom-class", "object", "complex", "builtin"],
)
def test_arbitrary_object_is_refused_with_its_type(value: Any, type_name: str) -> None:
    counter = _Counter()
    encoder = RecordEncoder(on_value=counter)
    with pytest.raises(EncodeError) as info:
        encoder.encode({"ok": Decimal(1), "bad": value})
    assert type_name in str(info.value)
    assert counter.kinds == []


def test_arbitrary_object_on_slow_path_is_refused_with_its_type() -> None:
    # the big int sends the record down the slow path before the object is met
    with pytest.raises(EncodeError, match="Unstorable"):
        RecordEncoder().encode({"a": 2**70, "b": Unstorable()})


def test_self_containing_dict_is_refused() -> None:
    record: dict[str, Any] = {"title": "loop"}
    record["self"] = record
    with pytest.raises(EncodeError, match="contains itself"):
        RecordEncoder().encode(record)


def test_self_containing_list_on_slow_path_is_refused() -> None:
    loop: list[Any] = ["\x00"]
    loop.append(loop)
    with pytest.raises(EncodeError, match=r"nested too deeply|contains itself"):
        RecordEncoder().encode({"loop": loop})


def test_encoder_keeps_working_after_a_refused_record() -> None:
    encoder = RecordEncoder()
    with pytest.raises(EncodeError):
        encoder.encode({"bad": Unstorable()})
    assert orjson.loads(encoder.encode({"good": 1})) == {"good": 1}


# the on_value callback


def test_each_conversion_is_reported_once_on_the_fast_path() -> None:
    counter = _Counter()
    RecordEncoder(on_value=counter).encode(
        {
            "when": dt.datetime(2024, 1, 1),
            "day": dt.date(2024, 1, 1),
            "price": Decimal("1"),
            "prices": [Decimal("2"), Decimal("3")],
            "raw": b"x",
            "tags": {"a"},
            "took": dt.timedelta(1),
        }
    )
    assert sorted(counter.kinds) == sorted(
        ["datetime", "date", "decimal", "decimal", "decimal", "bytes", "set", "timedelta"]
    )


SLOW_PATH_TRIGGERS = pytest.mark.parametrize(
    ("trigger", "trigger_kind"),
    [(2**70, "big_int"), ("\ud800", "surrogate"), ("\x00", "nul")],
    ids=["big-int", "surrogate", "nul"],
)


@SLOW_PATH_TRIGGERS
def test_each_conversion_is_reported_once_on_the_slow_path(trigger: Any, trigger_kind: str) -> None:
    counter = _Counter()
    out = RecordEncoder(on_value=counter).encode(
        {
            "trigger": trigger,
            "when": dt.datetime(2024, 1, 1),
            "day": dt.date(2024, 1, 1),
            "price": Decimal("1"),
            "raw": b"x",
            "took": dt.timedelta(1),
        }
    )
    assert orjson.loads(out)["when"] == "2024-01-01T00:00:00+00:00"
    assert sorted(counter.kinds) == sorted(
        [trigger_kind, "datetime", "date", "decimal", "bytes", "timedelta"]
    )


@SLOW_PATH_TRIGGERS
def test_set_conversion_is_reported_on_the_slow_path(trigger: Any, trigger_kind: str) -> None:
    # the fast path reports "set"; a record that takes the slow path must report it too
    counter = _Counter()
    out = RecordEncoder(on_value=counter).encode({"trigger": trigger, "tags": {"b", "a"}})
    assert orjson.loads(out)["tags"] == ["a", "b"]
    assert sorted(counter.kinds) == sorted([trigger_kind, "set"])


def test_refused_record_reports_nothing_now_or_later() -> None:
    # conversions of a record that is refused must not be counted, neither for it nor for
    # the next record (which has nothing to convert)
    counter = _Counter()
    encoder = RecordEncoder(on_value=counter)
    with pytest.raises(EncodeError):
        encoder.encode({"day": dt.date(2024, 1, 1), "big": 2**70, "bad": Unstorable()})
    assert counter.kinds == []
    encoder.encode({"plain": 1})
    assert counter.kinds == []


def test_encoder_without_callback_converts_too() -> None:
    out = RecordEncoder().encode({"d": Decimal("1.5"), "n": 2**70, "s": "\x00"})
    assert orjson.loads(out) == {"d": "1.5", "n": "1180591620717411303424", "s": "\ufffd"}


# IdFactory: ids are ints at capture, formatted as UUID text by the writers


def test_ids_are_valid_uuid7_strings() -> None:
    new_id = IdFactory()
    before_ms = time.time_ns() // 1_000_000
    ids = [format_uuid(new_id()) for _ in range(1000)]
    after_ms = time.time_ns() // 1_000_000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical lower-case 8-4-4-4-12 form
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before_ms <= parsed.int >> 80 <= after_ms  # 48-bit Unix millisecond prefix


@pytest.mark.parametrize("value", [0, 1, 0xFF << 60, 2**128 - 1])
def test_an_id_is_formatted_as_uuid_formats_it(value: int) -> None:
    assert format_uuid(value) == str(uuid.UUID(int=value))


def test_id_carries_the_capture_time() -> None:
    epoch = 1714564800.123
    parsed = uuid.UUID(format_uuid(IdFactory()(epoch)))
    assert parsed.version == 7
    assert parsed.int >> 80 == 1714564800123


def test_ids_are_unique_and_increasing() -> None:
    new_id = IdFactory()
    ids = []
    deadline = time.monotonic() + 0.05  # cross several milliseconds
    while time.monotonic() < deadline or len(ids) < 20_000:
        ids.append(new_id())
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    texts = [format_uuid(i) for i in ids]
    assert texts == sorted(texts)  # the text form sorts the same way
    assert all(uuid.UUID(t).int == i for t, i in zip(texts, ids, strict=True))


def test_two_factories_never_share_ids() -> None:
    first, second = IdFactory(), IdFactory()
    ids = [f() for _ in range(5000) for f in (first, second)]
    assert len(set(ids)) == len(ids)


def test_format_uuid_keeps_text() -> None:
    text = "01890a5d-ac96-774b-bcce-b302099a8057"
    assert format_uuid(text) == text
    assert format_uuid(uuid.UUID(text).int) == text
    assert format_uuid(5) == "00000000-0000-0000-0000-000000000005"


# TimestampFormatter

EPOCHS = [
    0.0,
    1714564800.0,  # 2024-05-01 12:00:00 UTC
    1714564800.5,
    1714564800.25,
    1714564799.999999,
    1714564799.9999997,  # rounds up into the next second
    1714564801.0009766,
    1789646404.9477587,  # the float is a hair below ...947759 s
    1700000000.123456,
    1893456000.000001,
]


@pytest.mark.parametrize("epoch", EPOCHS)
def test_timestamp_is_the_utc_time_of_the_epoch(epoch: float) -> None:
    text = TimestampFormatter()(epoch)
    parsed = dt.datetime.fromisoformat(text)
    assert parsed.utcoffset() == dt.timedelta(0)
    assert parsed == dt.datetime.fromtimestamp(epoch, UTC)


def test_timestamp_form() -> None:
    assert TimestampFormatter()(1714564800.25) == "2024-05-01 12:00:00.250000+00:00"


def test_timestamp_formatter_cache_follows_the_second() -> None:
    fmt = TimestampFormatter()
    # forwards, backwards and repeated seconds all format from scratch or from the cache
    for epoch in [
        1714564800.5,
        1714564801.5,
        1714564800.75,
        1714564800.75,
        1714568400.5,
        1714564801.5,
    ]:
        assert dt.datetime.fromisoformat(fmt(epoch)) == dt.datetime.fromtimestamp(epoch, UTC)


def test_timestamp_of_now() -> None:
    now = time.time()
    parsed = dt.datetime.fromisoformat(TimestampFormatter()(now))
    assert abs(parsed - dt.datetime.now(UTC)) < dt.timedelta(seconds=5)
