"""Data quality: item schemas, item keys and content hashes, and each job's quality figures.

Settings (see ``docs/validation.md``):

* ``INGEST_ITEM_SCHEMAS``: item type (class name or import path) -> pydantic model
* ``INGEST_VALIDATION``: ``off``, ``warn`` (store the item with its errors) or ``strict``
  (dead-letter it with its errors and drop it)
* ``INGEST_ITEM_KEYS``: item type -> field names, or a function of the item, giving the key
  under which the items table keeps one current row per item
* ``INGEST_HASH_EXCLUDE``: fields left out of the content hash (timestamps...)
* ``INGEST_KEEP_VERSIONS``: previous versions of keyed items go to ``item_versions``

Everything here runs on the reactor thread, once per item, for the item types named in
the settings; other items take the pipeline's fast path untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from itemadapter import ItemAdapter
from pydantic import BaseModel, ValidationError
from scrapy.utils.misc import load_object

from scrapy_ingest._stats import stat_key
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from scrapy.statscollectors import StatsCollector

    from scrapy_ingest.config import IngestConfig
    from scrapy_ingest.records import RecordEncoder

#: longest value shown in a validation error, in characters
ERROR_VALUE_MAX = 200
_EMPTY_TYPES = (str, list, dict, tuple, set, frozenset)


def is_empty(value: Any) -> bool:
    """None, or an empty text or collection: what field coverage counts as missing."""
    return value is None or (isinstance(value, _EMPTY_TYPES) and not value)


class ItemRejected(ValueError):
    """An item cannot be stored as its settings ask (invalid in strict mode, no key)."""

    def __init__(self, reason: str, *, invalid: bool) -> None:
        super().__init__(reason)
        #: invalid in strict mode (the item is dropped), rather than unkeyable
        self.invalid = invalid


class Checked(NamedTuple):
    """An item ready for its row: its JSON, key, content hash and validation errors."""

    data: bytes
    key: str | None = None
    #: for a keyed item, the INGEST_HASH_EXCLUDE fields it has: its ``content_hash`` column
    #: holds them until the writer computes the hash (``backends._upsert.split_keyed``); None
    #: for an item without a key
    content_hash: tuple[str, ...] | None = None
    #: the validation errors as JSON (INGEST_VALIDATION = "warn"), or None
    errors: bytes | None = None


@dataclass
class _TypeChecks:
    """What the settings ask of one item class."""

    label: str
    model: type[BaseModel] | None
    key: Callable[[Mapping[str, Any]], str] | None


@dataclass
class TypeFigures:
    """Quality figures of one item type in one job."""

    items: int = 0
    valid: int = 0
    invalid: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    #: the names of the fields not empty in an item -> items with just those (counting by
    #: shape costs a tuple per item; by field, a dict update per field)
    shapes: dict[tuple[str, ...], int] = field(default_factory=dict)

    def filled(self) -> dict[str, int]:
        """Field -> items in which it was not empty."""
        filled: dict[str, int] = {}
        for shape, count in self.shapes.items():
            for name in shape:
                filled[name] = filled.get(name, 0) + count
        return filled

    def as_dict(self, *, validated: bool, keyed: bool) -> dict[str, Any]:
        figures: dict[str, Any] = {"items": self.items}
        if validated:
            figures.update(valid=self.valid, invalid=self.invalid)
        if keyed:
            figures.update(new=self.new, changed=self.changed, unchanged=self.unchanged)
        items = self.items or 1
        figures["coverage"] = {
            name: round(count / items, 4) for name, count in sorted(self.filled().items())
        }
        return figures


class ItemChecks:
    """The checks of ``INGEST_ITEM_SCHEMAS`` and ``INGEST_ITEM_KEYS``, and their figures."""

    def __init__(self, config: IngestConfig, encoder: RecordEncoder) -> None:
        self._schemas = {
            name: _load_model(name, path) for name, path in config.item_schemas.items()
        }
        self._keys = {name: _load_key(name, spec) for name, spec in config.item_keys.items()}
        self._validate = config.validation != "off"
        self._strict = config.validation == "strict"
        self._exclude = tuple(sorted(config.hash_exclude))
        self._encode = encoder.encode
        self._by_class: dict[type, _TypeChecks] = {}
        #: item type -> its figures, for every item type seen
        self.figures: dict[str, TypeFigures] = {}
        self._validated: set[str] = set()
        self._keyed: set[str] = set()

    @classmethod
    def from_config(cls, config: IngestConfig, encoder: RecordEncoder) -> ItemChecks | None:
        """The checks, or None when no schema and no key is set (the pipeline's fast path)."""
        if not config.item_schemas and not config.item_keys:
            return None
        return cls(config, encoder)

    def check(self, item: Any) -> Checked:
        """Validate, key and encode *item*; raise ItemRejected, or EncodeError."""
        checks = self._checks_of(type(item))
        data = item if type(item) is dict else ItemAdapter(item).asdict()
        figures = self.figures.get(checks.label)
        if figures is None:
            figures = self.figures[checks.label] = TypeFigures()
        figures.items += 1
        try:
            filled = all(data.values())
        except Exception:  # a value whose truth is undefined (a numpy array)
            filled = False
        if filled:  # every field filled: the names as they are (no loop in Python)
            shape = tuple(data)
        else:  # is_empty(), inlined; only texts and collections are asked for their truth
            shape = tuple(
                [
                    name
                    for name, value in data.items()
                    if value is not None and (not isinstance(value, _EMPTY_TYPES) or value)
                ]
            )
        shapes = figures.shapes
        shapes[shape] = shapes.get(shape, 0) + 1
        errors: bytes | None = None
        if checks.model is not None and self._validate:
            try:
                data = checks.model.model_validate(data).model_dump()
            except ValidationError as exc:
                figures.invalid += 1
                found = validation_errors(exc)
                if self._strict:
                    raise ItemRejected(
                        f"the item is invalid ({checks.model.__name__}): "
                        + orjson.dumps(found).decode(),
                        invalid=True,
                    ) from None
                errors = orjson.dumps(found)
            else:
                figures.valid += 1
        if checks.key is None:
            return Checked(self._encode(data), errors=errors)
        key = checks.key(data)
        # the hash itself is computed where the batch is written, off the reactor thread
        # (backends._upsert.content_hash); the row carries the fields it leaves out
        leave_out = self._leave_out(data) if self._exclude else ()
        return Checked(self._encode(data, sort_keys=True), key, leave_out, errors)

    def _leave_out(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        """The INGEST_HASH_EXCLUDE fields that *data* has, in name order."""
        names = self._exclude
        if len(names) == 1:
            return names if names[0] in data else ()
        present = [name for name in names if name in data]
        if len(present) == len(names):  # the usual case: one tuple for every row
            return names
        return tuple(present)

    def _checks_of(self, cls: type) -> _TypeChecks:
        checks = self._by_class.get(cls)
        if checks is None:
            names = (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
            model = next((self._schemas[n] for n in names if n in self._schemas), None)
            key = next((self._keys[n] for n in names if n in self._keys), None)
            checks = self._by_class[cls] = _TypeChecks(cls.__name__, model, key)
            if model is not None and self._validate:
                self._validated.add(cls.__name__)
            if key is not None:
                self._keyed.add(cls.__name__)
        return checks

    def count_changes(self, changes: Mapping[str, Iterable[int]]) -> None:
        """Add the new / changed / unchanged counts of a written batch, by item type."""
        for label, (new, changed, unchanged) in changes.items():
            figures = self.figures.get(label)
            if figures is None:
                figures = self.figures[label] = TypeFigures()
            figures.new += new
            figures.changed += changed
            figures.unchanged += unchanged

    def as_dict(self) -> dict[str, Any]:
        """The figures, as ``ingest_jobs.quality`` holds them."""
        return {
            label: figures.as_dict(validated=label in self._validated, keyed=label in self._keyed)
            for label, figures in sorted(self.figures.items())
        }

    def publish(self, stats: StatsCollector) -> None:
        """Set the ``ingest/quality/<type>/...`` stats to the figures so far."""
        for label, figures in self.as_dict().items():
            area = f"quality/{label}"
            for name, value in figures.items():
                if name == "coverage":
                    for field_name, share in value.items():
                        stats.set_value(stat_key(area, f"coverage/{field_name}"), share)
                else:
                    stats.set_value(stat_key(area, name), value)


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """The errors of *exc* as ``{"field", "message", "type", "value"}`` dicts; long values
    are cut to ``ERROR_VALUE_MAX`` characters."""
    found = []
    for error in exc.errors(include_url=False):
        value = error.get("input")
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            value = repr(value)
        if isinstance(value, str) and len(value) > ERROR_VALUE_MAX:
            value = value[:ERROR_VALUE_MAX] + "...[truncated]"
        found.append(
            {
                "field": ".".join(str(part) for part in error["loc"]),
                "message": error["msg"],
                "type": error["type"],
                "value": value,
            }
        )
    return found


def key_text(values: tuple[Any, ...] | list[Any] | str | int) -> str:
    """The stored form of a key: one text or int value as text, several as a JSON array."""
    if isinstance(values, str):
        return values
    if isinstance(values, int):
        return str(values)
    if len(values) == 1 and isinstance(values[0], (str, int)) and not isinstance(values[0], bool):
        return str(values[0])
    return orjson.dumps(list(values), default=str).decode()


def _load_model(name: str, path: Any) -> type[BaseModel]:
    model = path
    if isinstance(path, str):
        try:
            model = load_object(path)
        except (ImportError, AttributeError, ValueError, NameError) as exc:
            raise ConfigError(
                f"INGEST_ITEM_SCHEMAS[{name!r}] ({path!r}) is invalid: it cannot be imported "
                f"({exc}). Fix: give the import path of a pydantic model, e.g. "
                "'myproject.schemas.Product'."
            ) from None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(
            f"INGEST_ITEM_SCHEMAS[{name!r}] ({path!r}) is invalid: it is not a pydantic model "
            "(a subclass of pydantic.BaseModel). Fix: give the import path of one."
        )
    return model


def _load_key(name: str, spec: Any) -> Callable[[Mapping[str, Any]], str]:
    fix = (
        "Fix: give a tuple of field names, e.g. ('sku',), or the import path of a function "
        "that takes the item's fields (a dict) and returns its key"
    )
    if isinstance(spec, str) and "." in spec:
        try:
            spec = load_object(spec)
        except (ImportError, AttributeError, ValueError, NameError) as exc:
            raise ConfigError(
                f"INGEST_ITEM_KEYS[{name!r}] ({spec!r}) is invalid: it cannot be imported "
                f"({exc}). {fix}."
            ) from None
    if isinstance(spec, str):
        spec = (spec,)
    if callable(spec):
        return _function_key(name, spec)
    if (
        not isinstance(spec, (list, tuple))
        or not spec
        or not all(isinstance(f, str) and f for f in spec)
    ):
        raise ConfigError(f"INGEST_ITEM_KEYS[{name!r}] ({spec!r}) is invalid. {fix}.")
    return _fields_key(name, tuple(spec))


def _fields_key(name: str, fields: tuple[str, ...]) -> Callable[[Mapping[str, Any]], str]:
    def values_of(data: Mapping[str, Any]) -> list[Any]:
        values = []
        for field_name in fields:
            value = data.get(field_name)
            if is_empty(value):
                raise ItemRejected(
                    f"its key field {field_name!r} (INGEST_ITEM_KEYS[{name!r}]) is missing or "
                    "empty. Fix: make the spider fill it, or key the item type on fields it "
                    "always has",
                    invalid=False,
                )
            values.append(value)
        return values

    if len(fields) > 1:
        return lambda data: key_text(values_of(data))
    only = fields[0]

    def key(data: Mapping[str, Any]) -> str:
        value = data.get(only)
        if type(value) is str and value:  # the common case, first
            return value
        return key_text(values_of(data))

    return key


def _function_key(
    name: str, function: Callable[[Mapping[str, Any]], Any]
) -> Callable[[Mapping[str, Any]], str]:
    def key(data: Mapping[str, Any]) -> str:
        value = function(data)
        if is_empty(value):
            raise ItemRejected(
                f"its key function (INGEST_ITEM_KEYS[{name!r}]) returned {value!r}. Fix: make "
                "it return a non-empty text, number or tuple for every item",
                invalid=False,
            )
        if not isinstance(value, (str, int, tuple, list)) or isinstance(value, bool):
            value = str(value)
        return key_text(value)

    return key
