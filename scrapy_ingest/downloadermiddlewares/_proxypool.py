"""The proxies of one crawler: which one a request gets, and which ones are benched.

Kept free of Scrapy (times are ``time.monotonic()`` values passed in), so that
the rules can be read, and tested, on their own. :class:`ProxyMiddleware
<scrapy_ingest.downloadermiddlewares.proxy.ProxyMiddleware>` drives it.

A proxy is *unchecked* until a response through it is not a ban, then *good*;
a ban or a connection failure *benches* it for a randomised exponential
backoff (``base * 2 ** (failures - 1)``, capped, times a random factor in
[0.5, 1]), after which it is *reanimated*: unchecked again, and benched for
twice as long if it fails again. A success resets its failures, unless the
request was sent before the proxy's last ban, or the proxy is still benched: a
request that was under way when the proxy was banned says nothing about the
proxy since (with concurrent downloads, one usually is), and a ban of such a
request belongs to the ban already counted.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

from scrapy_ingest._redact import REDACTED

if TYPE_CHECKING:
    from collections.abc import Hashable, Iterable

Policy = Literal["round_robin", "random", "least_used"]
Sticky = Literal["none", "domain", "cookiejar"]

#: schemes a proxy URL may have; socks proxies serve Playwright requests only, since Scrapy's
#: own HTTP download handler cannot use them
PROXY_SCHEMES = ("http", "https", "socks5", "socks4")
HTTP_SCHEMES = frozenset({"http", "https"})


def check_proxy_url(url: str) -> str:
    """Return the reason *url* cannot be a proxy, or ``""``."""
    if not isinstance(url, str):
        return "it is not a string"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        return f"it is not a URL ({exc})"
    if parts.scheme not in PROXY_SCHEMES:
        return f"its scheme must be one of {', '.join(PROXY_SCHEMES)}"
    if not parts.hostname or port is None:
        return "it must name a host and a port, as in http://user:password@host:3128"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "it must have no path, query or fragment"
    return ""


def proxy_name(url: str) -> str:
    """The proxy as shown in stats, logs and the request table: no password."""
    parts = urlsplit(url)
    user = f"{unquote(parts.username)}:{REDACTED}@" if parts.username else ""
    return f"{parts.scheme}://{user}{parts.hostname}:{parts.port}"


@dataclass(eq=False)
class Proxy:
    url: str  # as given, credentials included: never logged or stored
    name: str  # proxy_name(url)
    id: int  # stable for the crawl, even across reloads of INGEST_PROXY_FILE
    http: bool  # usable by Scrapy's HTTP download handler (not socks)
    failures: int = 0  # consecutive
    benched_until: float | None = None
    banned_at: float = -math.inf  # when it was last benched
    good: bool = False
    uses: int = 0
    in_flight: int = 0
    removed: bool = False  # gone from INGEST_PROXY_FILE; kept while requests use it

    def playwright_proxy(self) -> dict[str, str]:
        """The proxy as Playwright's ``proxy`` context option."""
        parts = urlsplit(self.url)
        option = {"server": f"{parts.scheme}://{parts.hostname}:{parts.port}"}
        if parts.username:
            option["username"] = unquote(parts.username)
            option["password"] = unquote(parts.password or "")
        return option


@dataclass
class _Session:
    proxy: Proxy
    last_used: float
    in_flight: int = 0


@dataclass
class ProxyPool:
    policy: Policy = "round_robin"
    exclusive: bool = False
    backoff_base: float = 60.0
    backoff_max: float = 1800.0
    session_idle: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    proxies: list[Proxy] = field(default_factory=list)
    _ids: dict[str, int] = field(default_factory=dict)
    _next_id: itertools.count[int] = field(default_factory=itertools.count)
    _cursor: int = 0
    _sessions: dict[Hashable, _Session] = field(default_factory=dict)
    _pinned: dict[str, Proxy] = field(default_factory=dict)
    #: when the first benched proxy comes back (a float compare per request finds out)
    next_reanimation: float = math.inf

    # the list

    def set_urls(self, urls: Iterable[str]) -> tuple[list[Proxy], list[Proxy]]:
        """Make the pool the proxies of *urls* (kept in order, duplicates once); proxies that
        stay keep their state. Return (added, removed)."""
        wanted = list(dict.fromkeys(u.strip() for u in urls))
        current = {p.url: p for p in self.proxies}
        added = [self._new(url) for url in wanted if url not in current]
        removed = [p for p in self.proxies if p.url not in set(wanted)]
        for proxy in removed:
            proxy.removed = True
        by_url = {**current, **{p.url: p for p in added}}
        self.proxies = [by_url[url] for url in wanted]
        for key in [k for k, s in self._sessions.items() if s.proxy.removed]:
            del self._sessions[key]
        return added, removed

    def pinned(self, url: str) -> Proxy:
        """The proxy a request pins with ``meta["ingest_proxy"]``: the pool's own when it lists
        that URL (so that it is counted and benched with it), else one outside the rotation."""
        for proxy in self.proxies:
            if proxy.url == url:
                return self._use(proxy)
        outside = self._pinned.get(url)
        if outside is None:
            outside = self._pinned[url] = self._new(url)
        return self._use(outside)

    def _new(self, url: str) -> Proxy:
        if url not in self._ids:
            self._ids[url] = next(self._next_id)
        scheme = urlsplit(url).scheme
        return Proxy(url, proxy_name(url), self._ids[url], scheme in HTTP_SCHEMES)

    # choosing

    def choose(self, session: Hashable | None, now: float, *, http: bool) -> Proxy | None:
        """The proxy for a request of *session* (None: no stickiness), or None when no proxy
        can take it now. *http*: the request goes through Scrapy's HTTP handler."""
        if session is not None:
            current = self._sessions.get(session)
            if current is not None:
                proxy = current.proxy
                if self._usable(proxy, now) and (proxy.http or not http):
                    current.last_used = now
                    current.in_flight += 1
                    return self._use(proxy)
                del self._sessions[session]  # its proxy is benched: the session ends
        picked = self._pick(now, http=http)
        if picked is None:
            return None
        if session is not None:
            self._sessions[session] = _Session(picked, now, 1)
        return self._use(picked)

    def _use(self, proxy: Proxy) -> Proxy:
        proxy.uses += 1
        proxy.in_flight += 1
        return proxy

    def _pick(self, now: float, *, http: bool) -> Proxy | None:
        reserved = self._reserved(now) if self.exclusive else set()
        proxies = self.proxies
        count = len(proxies)
        if self.policy == "round_robin":
            for step in range(count):
                proxy = proxies[(self._cursor + step) % count]
                if self._fits(proxy, now, reserved, http=http):
                    self._cursor = (self._cursor + step + 1) % count
                    return proxy
            return None
        candidates = [p for p in proxies if self._fits(p, now, reserved, http=http)]
        if not candidates:
            return None
        if self.policy == "random":
            return self.rng.choice(candidates)
        return min(candidates, key=lambda p: (p.in_flight, p.uses))  # least_used

    def _fits(self, proxy: Proxy, now: float, reserved: set[int], *, http: bool) -> bool:
        return self._usable(proxy, now) and proxy.id not in reserved and (proxy.http or not http)

    @staticmethod
    def _usable(proxy: Proxy, now: float) -> bool:
        return not proxy.removed and (proxy.benched_until is None or proxy.benched_until <= now)

    def _reserved(self, now: float) -> set[int]:
        """Proxies held by a live sticky session (INGEST_PROXY_EXCLUSIVE); sessions idle for
        longer than ``session_idle``, with nothing in flight, end here."""
        for key, session in list(self._sessions.items()):
            if session.in_flight == 0 and now - session.last_used > self.session_idle:
                del self._sessions[key]
        return {s.proxy.id for s in self._sessions.values()}

    # outcomes

    def done(self, proxy: Proxy, session: Hashable | None) -> None:
        """A request through *proxy* has its answer (whatever it is)."""
        proxy.in_flight -= 1
        current = self._sessions.get(session) if session is not None else None
        if current is not None and current.proxy is proxy:
            current.in_flight -= 1

    def succeeded(self, proxy: Proxy, sent: float) -> None:
        """A request sent through *proxy* at *sent* was not banned. Ignored while the proxy is
        benched, and for a request sent before its last ban, which would otherwise reset the
        failures that make each ban's bench twice as long as the last one's."""
        if proxy.benched_until is not None or sent < proxy.banned_at:
            return
        proxy.good = True
        proxy.failures = 0

    def bench(self, proxy: Proxy, now: float, sent: float | None = None) -> float:
        """Bench *proxy* after a ban or failure of a request sent at *sent* (None: unknown);
        return for how many seconds (0: not benched). A proxy that is benched already (several
        requests failed at once) keeps its time; a request sent before its last ban, failing
        after its reanimation, belongs to that ban."""
        if proxy.benched_until is not None and proxy.benched_until > now:
            return proxy.benched_until - now
        if sent is not None and sent < proxy.banned_at:
            return 0.0
        proxy.failures += 1
        proxy.banned_at = now
        proxy.good = False
        delay: float = min(self.backoff_max, self.backoff_base * 2.0 ** (proxy.failures - 1))
        delay *= self.rng.uniform(0.5, 1.0)
        proxy.benched_until = now + delay
        self.next_reanimation = min(self.next_reanimation, proxy.benched_until)
        return delay

    def reanimate(self, now: float) -> list[Proxy]:
        """Proxies whose bench time is over: unchecked again. Return them."""
        if now < self.next_reanimation:
            return []
        back = [p for p in self.proxies if p.benched_until is not None and p.benched_until <= now]
        for proxy in back:
            proxy.benched_until = None
        benched = [p.benched_until for p in self.proxies if p.benched_until is not None]
        self.next_reanimation = min(benched, default=math.inf)
        return back

    # the whole pool

    def states(self, now: float) -> dict[str, int]:
        """How many proxies are good, unchecked and benched."""
        counts = {"good": 0, "unchecked": 0, "benched": 0}
        for proxy in self.proxies:
            if proxy.benched_until is not None and proxy.benched_until > now:
                counts["benched"] += 1
            else:
                counts["good" if proxy.good else "unchecked"] += 1
        return counts

    def all_benched(self, now: float, *, http: bool) -> bool:
        """No proxy that could take such a request is usable, even ignoring sessions."""
        return not any(self._usable(p, now) and (p.http or not http) for p in self.proxies)

    def next_change(self, now: float) -> float | None:
        """When a proxy comes off the bench or a session may end, whichever is first."""
        times = [p.benched_until for p in self.proxies if p.benched_until is not None]
        if self.exclusive:
            times += [
                s.last_used + self.session_idle for s in self._sessions.values() if not s.in_flight
            ]
        future = [t for t in times if t > now]
        return min(future) if future else None
