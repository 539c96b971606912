"""The database router: which database (and table) each record goes to.

``INGEST_ROUTES`` takes one of two forms. A dict by record kind::

    INGEST_ROUTES = {
        "items": "postgresql://scraper:pw@db/scraping",
        "requests": "chdb:///var/lib/crawl/chdb",
        "logs": "sqlite:///logs.sqlite3",
    }

or an ordered list of rules, the first that matches a record wins::

    INGEST_ROUTES = [
        {"kind": "items", "item_type": "ProductItem", "url": "postgresql://...",
         "table": "products"},
        {"kind": "items", "spider": "news", "url": "sqlite:///news.sqlite3"},
        {"kind": "requests", "url": "chdb:///var/lib/crawl/chdb"},
    ]

A rule matches on ``kind`` (``items``, ``requests``, ``logs`` or ``jobs``),
and optionally on ``spider`` (the spider's name) and ``item_type`` (the item's
class name, for items); it gives ``url`` and optionally ``table`` (the full
table name; the default is the kind's table with ``INGEST_TABLE_PREFIX``).
Records no rule matches go to ``INGEST_DATABASE_URL``.

``INGEST_ROUTER`` names a class (an import path, or the class itself) for
logic that rules cannot express: its ``route(kind, record)`` returns a
:class:`Route`, or None to fall through to ``INGEST_ROUTES`` and then
``INGEST_DATABASE_URL``. It is built with ``from_crawler(crawler)`` when it has
one, else with no arguments. For items it is called with each item; for
requests and logs, whose rows all look alike, once per crawl with ``record``
None, so that routing costs nothing per request or log line.

Job rows are not routed one by one: the job row goes to every database that
receives records of the crawl (so joins on ``job_id`` work inside each
database), and also to the ``jobs`` route when there is one. Dead letters go
to the database their record was meant for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy.utils.misc import build_from_crawler, load_object

from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy.crawler import Crawler

#: the record kinds a route can name
ROUTED_KINDS = ("items", "requests", "logs", "jobs")
_RULE_KEYS = frozenset({"kind", "spider", "item_type", "url", "table"})


@dataclass(frozen=True)
class Route:
    """Where records go: a database URL and, optionally, a table name of that database."""

    url: str
    table: str | None = None


@dataclass(frozen=True)
class Rule:
    kind: str
    url: str
    spider: str | None = None
    item_type: str | None = None
    table: str | None = None
    #: how the rule is named in messages: ``INGEST_ROUTES['items']`` or ``INGEST_ROUTES[2]``
    source: str = "INGEST_ROUTES"

    def matches(self, kind: str, spider: str, item_type: str | None) -> bool:
        return (
            self.kind == kind
            and (self.spider is None or self.spider == spider)
            and (self.item_type is None or self.item_type == item_type)
        )

    @property
    def route(self) -> Route:
        return Route(self.url, self.table)


def parse_routes(value: Any, check_url: Callable[[str, str], None]) -> tuple[Rule, ...]:
    """Turn the ``INGEST_ROUTES`` setting into rules; raise ConfigError naming what is wrong.

    *check_url(url, source)* raises ConfigError for a URL no backend takes.
    """
    if not value:  # None, {} or []
        return ()
    if isinstance(value, dict):
        rules = []
        for kind, url in value.items():
            source = f"INGEST_ROUTES[{kind!r}]"
            _check_kind(kind, source)
            if not isinstance(url, str):
                raise ConfigError(
                    f"{source} ({url!r}) is invalid: it must be a database URL. Fix: map each "
                    "kind to a URL, e.g. {'logs': 'sqlite:///logs.sqlite3'}, or use the list "
                    "form for rules with a table."
                )
            check_url(url, source)
            rules.append(Rule(kind, url, source=source))
        return tuple(rules)
    if isinstance(value, (list, tuple)):
        return tuple(_rule(i, entry, check_url) for i, entry in enumerate(value))
    raise ConfigError(
        f"INGEST_ROUTES ({type(value).__name__}) is invalid: it must be a dict by kind or a list "
        "of rules. Fix: e.g. INGEST_ROUTES = {'logs': 'sqlite:///logs.sqlite3'}."
    )


def _rule(index: int, entry: Any, check_url: Callable[[str, str], None]) -> Rule:
    source = f"INGEST_ROUTES[{index}]"
    fix = (
        "Fix: give each rule 'kind' and 'url', and optionally 'spider', 'item_type' and "
        "'table', e.g. {'kind': 'items', 'item_type': 'ProductItem', 'url': "
        "'postgresql://...', 'table': 'products'}."
    )
    if not isinstance(entry, dict):
        raise ConfigError(f"{source} ({entry!r}) is invalid: a rule must be a dict. {fix}")
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{source} is invalid: unknown keys {sorted(unknown)}. {fix}")
    if "kind" not in entry or "url" not in entry:
        raise ConfigError(f"{source} is invalid: 'kind' and 'url' are required. {fix}")
    _check_kind(entry["kind"], source)
    for key in ("url", "spider", "item_type", "table"):
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            raise ConfigError(f"{source} is invalid: {key!r} must be a string. {fix}")
    if entry.get("item_type") and entry["kind"] != "items":
        raise ConfigError(f"{source} is invalid: 'item_type' only applies to kind 'items'. {fix}")
    if entry.get("table") and entry["kind"] == "jobs":
        raise ConfigError(
            f"{source} is invalid: the jobs table is named by INGEST_TABLE_PREFIX, not by a "
            f"route. {fix}"
        )
    if entry.get("table"):
        check_table_name(entry["table"], source)
    check_url(entry["url"], source)
    return Rule(
        entry["kind"],
        entry["url"],
        spider=entry.get("spider"),
        item_type=entry.get("item_type"),
        table=entry.get("table"),
        source=source,
    )


def _check_kind(kind: Any, source: str) -> None:
    if kind not in ROUTED_KINDS:
        raise ConfigError(
            f"{source} is invalid: the kind {kind!r} is none of {', '.join(ROUTED_KINDS)}. "
            "Fix: route one of those kinds."
        )


def check_table_name(name: str, source: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ConfigError(
            f"{source} ({name!r}) is invalid: a table name must match [a-z_][a-z0-9_]* and be "
            "at most 63 characters. Fix: e.g. 'products'."
        )


class Router:
    """Route the records of one crawler (one spider)."""

    def __init__(
        self, rules: tuple[Rule, ...], default_url: str, spider: str, custom: Any = None
    ) -> None:
        self.default = Route(default_url)
        self.spider = spider
        #: the rules that can match this spider's records, in order
        self.rules = tuple(r for r in rules if r.spider is None or r.spider == spider)
        self.custom = custom
        #: whether items need a route each (item_type rules, or a custom router)
        self.per_item = custom is not None or any(r.item_type for r in self.rules)
        self._by_item_type: dict[str, Route] = {}

    def route(self, kind: str, record: Any = None, item_type: str | None = None) -> Route:
        """The route of a record of *kind* (for items, *record* is the item)."""
        if self.custom is not None:
            found = self.custom.route(kind, record)
            if found is not None:
                if not isinstance(found, Route):
                    raise TypeError(
                        f"{type(self.custom).__qualname__}.route() returned {found!r}; it must "
                        "return a scrapy_ingest.router.Route or None"
                    )
                return found
        for rule in self.rules:
            if rule.matches(kind, self.spider, item_type):
                return rule.route
        return self.default

    def item_route(self, item: Any) -> Route:
        item_type = type(item).__name__
        if self.custom is not None:
            return self.route("items", item, item_type)
        route = self._by_item_type.get(item_type)
        if route is None:
            route = self._by_item_type[item_type] = self.route("items", item, item_type)
        return route

    def static_urls(self) -> list[str]:
        """Every URL this crawler's records may go to by rule, without repeats.

        The default comes first, when some records may fall through to it: a
        kind no unconditional rule routes, or a custom router.
        """
        falls_through = self.custom is not None or any(
            self.falls_through(kind) for kind in ("items", "requests", "logs")
        )
        urls = [self.default.url] if falls_through else []
        urls += [rule.url for rule in self.rules]
        return list(dict.fromkeys(urls))

    def falls_through(self, kind: str) -> bool:
        """Whether some records of *kind* may go to the default: no rule takes them all."""
        return not any(r.kind == kind and r.item_type is None for r in self.rules)

    def describe(self, url: str) -> str:
        """Which settings send records to *url*, for messages."""
        sources = [rule.source for rule in self.rules if rule.url == url]
        if url == self.default.url:
            sources.insert(0, "INGEST_DATABASE_URL")
        return ", ".join(sources) or "INGEST_ROUTER"


def custom_router(path: Any, crawler: Crawler) -> Any:
    """The ``INGEST_ROUTER`` of *crawler* (an import path or a class), built; None if unset."""
    if path is None:
        return None
    try:
        cls = load_object(path) if isinstance(path, str) else path
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"INGEST_ROUTER ({path!r}) is invalid: it cannot be imported ({exc}). Fix: give "
            "the import path of a class with a route(kind, record) method."
        ) from None
    router = build_from_crawler(cls, crawler) if hasattr(cls, "from_crawler") else cls()
    if not callable(getattr(router, "route", None)):
        raise ConfigError(
            f"INGEST_ROUTER ({path!r}) is invalid: it has no route(kind, record) method. "
            "Fix: give it one that returns a scrapy_ingest.router.Route or None."
        )
    return router
