"""scrapy-redis's scheduler with leases: a request taken from Redis stays there until it is done.

scrapy-redis's :class:`~scrapy_redis.scheduler.Scheduler` pops a request from the shared Redis
queue and forgets it: when the worker process dies (killed, out of memory, the machine lost),
the requests it was downloading or parsing are gone from the crawl. This subclass moves each
request it pops, in the same atomic Redis script, into a hash of the worker's leases; the lease
is given back (deleted) once the request is done and the items it produced are in the database:

* a request is done when it has left the engine (downloaded, its callback or errback run, its
  items through the pipelines and its new requests in Redis);
* the items of done requests are written (the items writers are drained) before their leases are
  given back, every ``INGEST_REDIS_LEASE_TIMEOUT / 3`` seconds (at most 1 s);
* a new request is marked seen in scrapy-redis's dupefilter and pushed to the queue in one
  atomic Redis script: a worker killed between the two (scrapy-redis makes two calls) left the
  request marked seen and not queued, and the page that links to it, crawled again from its
  lease, then found it a duplicate: it was never crawled;
* a request that a middleware sets aside to wait (a backoff, a ``Retry-After``, no free proxy:
  :mod:`scrapy_ingest.downloadermiddlewares._delay`) waits in this process's memory, out of the
  engine, so it gets a lease of its own while it waits, given back once it is in the queue again.

Every worker refreshes its entry in a sorted set of workers at the same pace, with Redis's own
clock, and then, if the queue has requests, wakes its engine (which otherwise asks for more only
when one of its downloads ends, or every 5 seconds). A worker whose entry is older than
``INGEST_REDIS_LEASE_TIMEOUT`` is presumed dead: the first live worker that sees it puts its
leased requests back in the queue, in one atomic script, so they are crawled again (keyed items,
``INGEST_ITEM_KEYS``, are then not stored twice). While any worker holds a lease,
:meth:`has_pending_requests` is true, so no worker closes for being idle while another one may
still add requests, or has died holding some.

The add-on puts this class in place of ``scrapy_redis.scheduler.Scheduler`` when a project sets
that one (``INGEST_REDIS_LEASES = False`` keeps scrapy-redis's). Alone::

    SCHEDULER = "scrapy_ingest.scheduler.RedisLeaseScheduler"

Redis keys, next to the queue key ``Q`` (``SCHEDULER_QUEUE_KEY``): ``Q:workers`` (sorted set,
worker -> last refresh), ``Q:leases:<worker>`` (hash, lease -> queue entry) and ``Q:leased``
(the number of leases, all workers). Works with scrapy-redis's three queue classes; with its
list queues, ``SCHEDULER_IDLE_BEFORE_CLOSE`` does not make pops wait.

Settings: ``INGEST_REDIS_LEASES``, ``INGEST_REDIS_LEASE_TIMEOUT``. Stats:
``ingest/redis/leases_returned`` (leases given back), ``ingest/redis/requeued`` (requests of
dead workers put back by this one).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import NotConfigured
from scrapy_redis.dupefilter import RFPDupeFilter
from scrapy_redis.queue import FifoQueue, LifoQueue, PriorityQueue
from scrapy_redis.scheduler import Scheduler

from scrapy_ingest import settings as defaults
from scrapy_ingest._aio import as_deferred, in_thread
from scrapy_ingest._compat import (
    Looping,
    decode_queued_request,
    encode_queued_request,
    looping_call,
    requests_in_progress,
    wake_engine,
)
from scrapy_ingest._stats import stat_key
from scrapy_ingest.config import IngestConfig
from scrapy_ingest.downloadermiddlewares._delay import request_held, request_released
from scrapy_ingest.exceptions import ConfigError
from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

logger = logging.getLogger(__name__)

#: the longest pause between two refreshes (and lease returns) of a worker, in seconds
MAX_REFRESH_INTERVAL = 1.0
#: leases given back per Redis call
RETURN_CHUNK = 1000

# A queue entry kept in a lease is "<how to put it back>\n<the encoded request>": "z<score>"
# for the priority queue (a sorted set), "R" (RPUSH) or "L" (LPUSH) for the list queues, so that
# a request put back is the next one popped.
_POP_SORTED = """
local popped = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not popped[1] then return false end
redis.call('ZREM', KEYS[1], popped[1])
redis.call('HSET', KEYS[2], ARGV[1], 'z' .. popped[2] .. '\\n' .. popped[1])
redis.call('INCR', KEYS[3])
return popped[1]
"""
_POP_LIST = """
local popped
if ARGV[2] == 'R' then popped = redis.call('RPOP', KEYS[1])
else popped = redis.call('LPOP', KEYS[1]) end
if not popped then return false end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '\\n' .. popped)
redis.call('INCR', KEYS[3])
return popped
"""
# the dupefilter's mark and the push of a new request, as scrapy-redis's enqueue_request (its
# RFPDupeFilter.request_seen, then the queue's push: ZADD, else LPUSH) does them in two calls; a
# request with dont_filter has no fingerprint (ARGV[1] is empty) and is not marked
_PUSH = """
if ARGV[1] ~= '' and redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'z' then redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
else redis.call('LPUSH', KEYS[1], ARGV[4]) end
return 1
"""
_HOLD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
"""
_RETURN = """
local returned = redis.call('HDEL', KEYS[1], unpack(ARGV))
if returned > 0 then redis.call('DECRBY', KEYS[2], returned) end
return returned
"""
_REQUEUE = """
local leases = redis.call('HGETALL', KEYS[2])
local count = 0
for i = 2, #leases, 2 do
  local entry = leases[i]
  local cut = string.find(entry, '\\n', 1, true)
  local how, data = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
  if how == 'R' then redis.call('RPUSH', KEYS[1], data)
  elseif how == 'L' then redis.call('LPUSH', KEYS[1], data)
  else redis.call('ZADD', KEYS[1], tonumber(string.sub(how, 2)), data) end
  count = count + 1
end
redis.call('DEL', KEYS[2])
if count > 0 then redis.call('DECRBY', KEYS[3], count) end
redis.call('ZREM', KEYS[4], ARGV[1])
return count
"""
_REFRESH = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
"""


class RedisLeaseScheduler(Scheduler):  # type: ignore[misc]  # scrapy-redis has no type hints
    """scrapy-redis's scheduler whose popped requests are leased until done (see the module)."""

    crawler: Crawler
    lease_timeout: float
    #: this process's name in Redis: host, pid and a random part
    worker: str
    #: the requests popped and not yet given back -> their lease
    _leases: dict[Request, str]
    #: the requests a middleware set aside to wait (see _hold) -> their lease
    _held: dict[Request, str]
    #: the leases of held requests that are back in the queue, to give back
    _released: list[str]
    _lease_ids: Iterator[int]
    _loops: list[Looping]
    #: the dupefilter's Redis set, marked in the script that pushes a new request; None when the
    #: dupefilter is not scrapy-redis's on this server (scrapy-redis's enqueue_request then)
    _seen_key: str | None

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RedisLeaseScheduler:
        scheduler: RedisLeaseScheduler = super().from_crawler(crawler)
        scheduler.crawler = crawler
        # validated with every INGEST_* setting (a ConfigError names the setting and the fix)
        scheduler.lease_timeout = IngestConfig.from_settings(crawler.settings).redis_lease_timeout
        scheduler.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        scheduler._leases = {}
        scheduler._held = {}
        scheduler._released = []
        scheduler._lease_ids = itertools.count(1)
        scheduler._loops = []
        scheduler._seen_key = None
        crawler.signals.connect(scheduler._hold, signal=request_held)
        crawler.signals.connect(scheduler._unhold, signal=request_released)
        return scheduler

    # keys

    def _key(self, suffix: str) -> str:
        return f"{self.queue.key}:{suffix}"

    def _lease_key(self, worker: str) -> str:
        return self._key(f"leases:{worker}")

    # the scheduler interface

    def open(self, spider: Spider) -> Any:
        result = super().open(spider)
        self._pop_how = _pop_how(self.queue, self.crawler)
        server = self.server
        self._pop = server.register_script(_POP_SORTED if self._pop_how == "z" else _POP_LIST)
        self._return = server.register_script(_RETURN)
        self._hold_script = server.register_script(_HOLD)
        self._requeue_script = server.register_script(_REQUEUE)
        self._refresh_script = server.register_script(_REFRESH)
        self._push = server.register_script(_PUSH)
        self._seen_key = _seen_key(self.df, server)
        if self._seen_key is None and getattr(self.df, "server", None) is not None:
            logger.warning(
                "DUPEFILTER_CLASS (%s) keeps its fingerprints in Redis, but is not scrapy-redis's "
                "RFPDupeFilter on the queue's server: a request is marked seen and pushed in two "
                "calls, and a worker killed between them loses that request. Use "
                "scrapy_redis.dupefilter.RFPDupeFilter for a crawl that loses nothing.",
                type(self.df).__name__,
            )
        # known as alive before the first lease; dead workers' requests back in the queue
        requeued, _ = self._refresh()
        self._count_requeued(requeued)
        interval = min(self.lease_timeout / 3, MAX_REFRESH_INTERVAL)
        for call in (self._refresh_later, self._return_done):
            loop = looping_call(call)
            loop.start(interval, now=False).addErrback(
                lambda failure: logger.error("Redis leases: %s", failure.getErrorMessage())
            )
            self._loops.append(loop)
        logger.info(
            "Leasing the requests taken from %s as worker %s (a worker silent for %s s is "
            "presumed dead and its requests put back)",
            self.queue.key,
            self.worker,
            self.lease_timeout,
        )
        return result

    def close(self, reason: str) -> Any:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self._released:  # in the queue already: not to be put back a second time
            self._give_back_now(self._released)
        # a worker closing early (shutdown) puts back what it had not finished, and the requests
        # still set aside to wait
        put_back = self._requeue(self.worker)
        if put_back:
            logger.info("Put %d unfinished requests back in %s", put_back, self.queue.key)
        self._leases.clear()
        self._held.clear()
        self._released.clear()
        return super().close(reason)

    def enqueue_request(self, request: Request) -> bool:
        """scrapy-redis's ``enqueue_request``, its dupefilter's check and mark and the push in one
        Redis script: a request is either seen and queued, or neither."""
        if self._seen_key is None:
            return bool(super().enqueue_request(request))
        fingerprint = "" if request.dont_filter else self.df.request_fingerprint(request)
        # encoded before the check: the script's one call does both
        data = encode_queued_request(self.queue, request)
        how = "z" if self._pop_how == "z" else "L"
        keys = [self.queue.key, self._seen_key]
        if not self._push(keys=keys, args=[fingerprint, how, -request.priority, data]):
            self.df.log(request, self.spider)
            return False
        if self.stats:
            self.stats.inc_value("scheduler/enqueued/redis")
        return True

    def next_request(self) -> Request | None:
        lease = str(next(self._lease_ids))
        keys = [self.queue.key, self._lease_key(self.worker), self._key("leased")]
        args = [lease] if self._pop_how == "z" else [lease, self._pop_how]
        data = self._pop(keys=keys, args=args)
        if data is None:
            return None
        request = decode_queued_request(self.queue, data)
        self._leases[request] = lease
        if self.stats:
            self.stats.inc_value("scheduler/dequeued/redis")
        return request

    def has_pending_requests(self) -> bool:
        """True while the queue has requests, or any worker holds a lease (it may add requests,
        or have died holding them: they come back once its lease times out)."""
        return len(self.queue) > 0 or int(self.server.get(self._key("leased")) or 0) > 0

    # leases

    def _refresh_later(self) -> Deferred[None]:
        """The lease loop's call (a LoopingCall waits for the Deferred it returns)."""
        return as_deferred(self._refresh_off_thread())

    async def _refresh_off_thread(self) -> None:
        self._refreshed(await in_thread(self._refresh))

    def _refreshed(self, counts: tuple[int, int]) -> None:
        """Back on the reactor thread: count what was put back; wake the engine when the
        queue has requests (other workers pushed them while this one had none to do)."""
        requeued, queued = counts
        self._count_requeued(requeued)
        if queued:
            wake_engine(self.crawler)

    def _count_requeued(self, requeued: int) -> None:
        if requeued and self.stats:
            self.stats.inc_value(stat_key("redis", "requeued"), requeued)

    def _refresh(self) -> tuple[int, int]:
        """Say this worker is alive; put back the requests of workers that are not. Return how
        many requests were put back, and how many the queue has. In a thread."""
        stale = self._refresh_script(
            keys=[self._key("workers")], args=[self.worker, self.lease_timeout]
        )
        requeued = 0
        for name in stale:
            worker = name.decode() if isinstance(name, bytes) else str(name)
            if worker == self.worker:
                continue  # this process was paused for longer than the timeout: still alive
            count = self._requeue(worker)
            requeued += count
            logger.warning(
                "Worker %s of %s stopped refreshing its leases for %s s: its %d requests are "
                "back in the queue",
                worker,
                self.queue.key,
                self.lease_timeout,
                count,
            )
        return requeued, len(self.queue)

    def _requeue(self, worker: str) -> int:
        keys = [self.queue.key, self._lease_key(worker), self._key("leased"), self._key("workers")]
        return int(self._requeue_script(keys=keys, args=[worker]))

    def _return_done(self) -> Deferred[None]:
        return as_deferred(self._give_back())

    async def _give_back(self) -> None:
        """Give back the leases of requests done, once their items are written."""
        in_progress = requests_in_progress(self.crawler)
        if in_progress is None:  # the engine is stopping: close() puts back what is left
            return
        done = [request for request in self._leases if request not in in_progress]
        if done:
            await self._drain_items()
        # the held requests given back to the engine are in the queue: nothing to wait for
        leases = [*(self._leases.pop(request) for request in done), *self._released]
        self._released = []
        if not leases:
            return
        returned = await in_thread(self._give_back_now, leases)
        if self.stats:
            self.stats.inc_value(stat_key("redis", "leases_returned"), returned)

    def _hold(self, request: Request) -> None:
        """Lease a request that a middleware set aside to wait (``request_held``).

        The request it came from (a retry's, or the one that found its domain paused or no proxy
        free) has left the engine, and its lease is given back at the next round; the copy that
        waits lives in this process's memory only, until its timer hands it back to the engine,
        which pushes it to the shared queue. Leased meanwhile, it is put back in the queue with
        this worker's other leases if the worker dies (or closes) before. It is then crawled at
        once by whichever worker pops it, not at its not-before time, which is this process's
        clock: a site that still refuses it gets another retry, with its own ``Retry-After``.
        """
        lease = str(next(self._lease_ids))
        # put back where a pop finds it next, as a popped request (see _POP_SORTED)
        how = f"z{-request.priority}" if self._pop_how == "z" else self._pop_how
        data = encode_queued_request(self.queue, request)
        entry = how.encode() + b"\n" + (data.encode() if isinstance(data, str) else data)
        keys = [self._lease_key(self.worker), self._key("leased")]
        self._hold_script(keys=keys, args=[lease, entry])
        self._held[request] = lease

    def _unhold(self, request: Request) -> None:
        """A held request is in the queue again (``request_released``): its lease can go."""
        lease = self._held.pop(request, None)
        if lease is not None:
            self._released.append(lease)

    def _give_back_now(self, leases: list[str]) -> int:
        keys = [self._lease_key(self.worker), self._key("leased")]
        return sum(
            int(self._return(keys=keys, args=leases[start : start + RETURN_CHUNK]))
            for start in range(0, len(leases), RETURN_CHUNK)
        )

    async def _drain_items(self) -> None:
        if not self.crawler.settings.getbool("INGEST_ENABLED", defaults.INGEST_ENABLED):
            return  # nothing of ours to wait for
        try:
            runtime = IngestRuntime.of(self.crawler)
        except NotConfigured:
            return
        if runtime.databases is not None and not runtime.closing:
            await runtime.databases.drain("items")


def _seen_key(dupefilter: Any, server: Any) -> str | None:
    """The Redis set of *dupefilter* that the push script can mark, or None unless it is
    scrapy-redis's ``RFPDupeFilter`` (its own ``request_seen``) on the queue's *server*."""
    if not isinstance(dupefilter, RFPDupeFilter):
        return None
    if type(dupefilter).request_seen is not RFPDupeFilter.request_seen:
        return None  # a subclass's own check (a Bloom filter...) cannot run in the script
    if _address(dupefilter.server) != _address(server):
        return None
    return str(dupefilter.key)


def _address(server: Any) -> tuple[Any, ...]:
    """Where a redis-py client connects: host, port, socket path and database."""
    kwargs = getattr(getattr(server, "connection_pool", None), "connection_kwargs", {})
    return tuple(kwargs.get(name) for name in ("host", "port", "path", "db"))


def _pop_how(queue: Any, crawler: Crawler) -> str:
    """How a popped entry of *queue* is put back: ``z`` (sorted set), ``R`` or ``L``."""
    if isinstance(queue, PriorityQueue):
        return "z"
    if isinstance(queue, FifoQueue):
        return "R"  # pushed with LPUSH, popped with RPOP
    if isinstance(queue, LifoQueue):
        return "L"
    name = crawler.settings.get("SCHEDULER_QUEUE_CLASS")
    raise ConfigError(
        f"SCHEDULER_QUEUE_CLASS ({name!r}) is not supported by "
        "scrapy_ingest.scheduler.RedisLeaseScheduler: it leases requests from scrapy-redis's "
        "PriorityQueue, FifoQueue and LifoQueue only. Fix: use one of those, or set "
        "INGEST_REDIS_LEASES = False to keep scrapy-redis's own scheduler (without leases)."
    )
