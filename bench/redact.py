"""What hiding URL secrets costs, per request URL and per log line.

    python bench/redact.py [--rounds 7] [--number 200000]

Times, in one process and alternating round by round, the redaction a crawl runs on every
request URL and every stored log line (scrapy_ingest._redact.Redactor with the default
INGEST_REDACT_QUERY_PARAMS, plus redact_text on log lines) against the rule it replaced
(redact_url on URLs, redact_text on log lines), on URLs and Scrapy log lines of four shapes:
no query, a query without secrets, a query with a secret, and a log line with two URLs.
Prints the median nanoseconds per call of each and their ratio (new / old), and the cost of
one call next to the crawl's own cost per request (about 400 us of CPU per page on these
machines: docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import timeit

from scrapy_ingest import settings as defaults
from scrapy_ingest._redact import Redactor, redact_text, redact_url

URLS = {
    "no query": "https://shop.example.com/catalogue/category/books/travel_2/index.html",
    "query": "https://shop.example.com/search?q=garden+chairs&page=3&sort=price_asc",
    "secret": "https://bucket.s3.amazonaws.com/a.csv?X-Amz-Expires=60&X-Amz-Signature=f00d",
}
LOG_LINE = (
    "Crawled (200) <GET https://shop.example.com/search?q=garden+chairs&page=3> "
    "(referer: https://shop.example.com/search?q=garden+chairs&page=2)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    redact = Redactor(defaults.INGEST_REDACT_QUERY_PARAMS)
    if "f00d" in redact(URLS["secret"]) or redact(URLS["query"]) != URLS["query"]:
        raise SystemExit("the redaction does not do what it is measured for")
    cases = {
        **{
            f"url, {name}": (lambda u=url: redact(u), lambda u=url: redact_url(u))
            for name, url in URLS.items()
        },
        "log line": (lambda: redact(redact_text(LOG_LINE)), lambda: redact_text(LOG_LINE)),
    }
    print(f"{'case':20} {'new ns':>8} {'old ns':>8} {'new/old':>8}")
    for name, (new, old) in cases.items():
        times: dict[str, list[float]] = {"new": [], "old": []}
        for _ in range(args.rounds):  # alternating, so a busy moment hits both
            for label, call in (("new", new), ("old", old)):
                seconds = timeit.timeit(call, number=args.number)
                times[label].append(seconds / args.number * 1e9)
        new_ns, old_ns = statistics.median(times["new"]), statistics.median(times["old"])
        print(f"{name:20} {new_ns:8.0f} {old_ns:8.0f} {new_ns / old_ns:8.2f}")


if __name__ == "__main__":
    main()
