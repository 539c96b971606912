"""The one helper that owns the ``ingest/`` prefix of stats keys, and this process's own stats
when the crawler's stats collector is shared between processes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrapy.utils.python import global_object_name

from scrapy_ingest._compat import replace_stats_method

if TYPE_CHECKING:
    from collections.abc import Callable

PREFIX = "ingest"


def stat_key(area: str, event: str) -> str:
    """Return the stats key for *event* in *area*, e.g. ``ingest/items/stored``."""
    return f"{PREFIX}/{area}/{event}"


#: stats collectors that keep one set of stats for many processes (their classes, or bases)
SHARED_COLLECTORS = frozenset({"scrapy_redis.stats.RedisStatsCollector"})

#: the collector methods that change stats, which ProcessStats records as well
_WRITERS = ("set_value", "set_stats", "inc_value", "max_value", "min_value", "clear_stats")


def is_shared(collector: object) -> bool:
    """Whether *collector* is (a subclass of) a stats collector shared between processes."""
    return any(global_object_name(c) in SHARED_COLLECTORS for c in type(collector).__mro__)


class ProcessStats:
    """The stats counted by this process, even when the crawler's collector is shared.

    scrapy-redis's ``RedisStatsCollector`` keeps one hash in Redis per spider, which every
    process of a distributed crawl adds to: read back, ``item_scraped_count`` is the whole
    crawl's, and the values come back as text. The job row and the metrics are per process, so
    for such a collector this records every change this process makes through it (the
    collector is this process's own object; only its storage is shared), in a dict, the way
    Scrapy's ``MemoryStatsCollector`` would. For any other collector, :meth:`get_stats` is the
    collector's own.
    """

    def __init__(self, collector: Any) -> None:
        self._collector = collector
        self._values: dict[str, Any] | None = None
        #: how deep in calls of the shared collector's methods (the reactor thread only)
        self._depth = 0
        if is_shared(collector):
            self._values = {}
            for name in _WRITERS:
                tee = self._tee(getattr(collector, name), getattr(self, f"_{name}"))
                replace_stats_method(collector, name, tee)

    @property
    def shared(self) -> bool:
        return self._values is not None

    def get_stats(self) -> dict[str, Any]:
        """This process's stats (a copy)."""
        if self._values is None:
            return dict(self._collector.get_stats())
        return dict(self._values)

    def _set_value(self, key: str, value: Any, spider: Any = None) -> None:
        assert self._values is not None
        self._values[key] = value

    def _set_stats(self, stats: dict[str, Any], spider: Any = None) -> None:
        assert self._values is not None
        self._values = dict(stats)

    def _inc_value(self, key: str, count: int = 1, start: int = 0, spider: Any = None) -> None:
        assert self._values is not None
        self._values[key] = self._values.setdefault(key, start) + count

    def _max_value(self, key: str, value: Any, spider: Any = None) -> None:
        assert self._values is not None
        self._values[key] = max(self._values.setdefault(key, value), value)

    def _min_value(self, key: str, value: Any, spider: Any = None) -> None:
        assert self._values is not None
        self._values[key] = min(self._values.setdefault(key, value), value)

    def _clear_stats(self, spider: Any = None) -> None:
        assert self._values is not None
        self._values.clear()

    def _tee(self, shared: Callable[..., Any], local: Callable[..., None]) -> Callable[..., Any]:
        """A change made through *shared* that is made to this process's stats too, once: the
        shared collector's methods call one another (RedisStatsCollector's inc_value calls
        its set_value), and those inner calls are not this process's changes."""

        def write(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                local(*args, **kwargs)
            self._depth += 1
            try:
                return shared(*args, **kwargs)
            finally:
                self._depth -= 1

        return write
