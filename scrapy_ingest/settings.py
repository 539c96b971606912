"""Default values of every ``INGEST_*`` setting.

Like Scrapy's ``default_settings.py``, this module is the one place where
defaults live. :class:`scrapy_ingest.config.IngestConfig` reads these names
from a crawler's settings, falls back to the values here for the ones a
project does not set (with or without the add-on), and validates them.

Why these numbers (see ``docs/performance.md`` for the measurements):

* ``INGEST_BATCH_ROWS`` / ``INGEST_BATCH_BYTES``: the benchmark crawl was
  fastest with 2,000 rows per batch (against 500 and 8,000); 2,000 rows of
  ~800-byte items are ~1.6 MiB, under the 4 MiB that caps batches of
  bigger items.
* ``INGEST_FLUSH_INTERVAL``: a slow crawl still shows its items in SQL within
  about a second.
* ``INGEST_WRITER_PROCESS``: PostgreSQL writes run in a child process, since
  writer threads fighting the busy reactor thread for the GIL made the write
  path 3x slower and the benchmark crawl 0.45 of a crawl without a pipeline
  (0.715 with the process). SQLite too, since its writer process keeps
  SQLAlchemy's import (0.2 to 0.4 s) out of the crawl process.
* ``INGEST_MAX_BUFFER_BYTES``: 64 MiB covers several batches in flight per
  table, far more than a healthy database needs, and stays small next to
  Scrapy's own memory use.
* ``INGEST_LOG_LEVEL``: ``INFO`` keeps what an operator reads (warnings,
  errors, the crawl's milestones) without Scrapy's two ``DEBUG`` lines per
  page, which would make ``ingest_logs`` the biggest table of a crawl.
* ``INGEST_METRICS_ENABLED``: off, since it opens a port; ``INGEST_METRICS_PORT``
  a range, like Scrapy's ``TELNETCONSOLE_PORT``, so that several crawls on one
  machine each find one; ``INGEST_METRICS_UNHEALTHY_AFTER`` half of
  ``INGEST_RETRY_TIMEOUT``: unhealthy well before rows are given up on.
* ``INGEST_PROXY_BACKOFF_BASE`` / ``INGEST_PROXY_BACKOFF_MAX``: a banned proxy
  rests a minute, then 2, 4, ... up to half an hour, as scrapy-rotating-proxies
  taught users to expect (sites ban for minutes, not seconds);
  ``INGEST_PROXY_ALL_DEAD_TIMEOUT`` five minutes: long enough for a first
  reanimation, short enough not to idle for the night. ``INGEST_PROXY_MAX_TRIES``
  5: a page banned through five proxies is more likely banned for everyone.
* ``INGEST_REQUESTS_STORE_HEADERS``: off, since headers are most of a request
  row's size and rarely queried.
* ``INGEST_RETRY_ENABLED``: off, since it changes when Scrapy retries, which a
  project should choose. ``INGEST_RETRY_BACKOFF_BASE`` 0.5 s: a first retry
  waits 0.25 s on average, about one page of a polite crawl;
  ``INGEST_RETRY_BACKOFF_MAX`` a minute, reached by the 8th failure round,
  since rate limits and restarts usually last seconds to minutes;
  ``INGEST_RETRY_AFTER_MAX`` five minutes: a site asking for more is better
  retried by the next crawl than waited for with the crawl held open.
* ``INGEST_REQUIRE_BACKEND``: off, so that a database down at start costs the
  crawl nothing (batches wait in the spill journal); ``INGEST_SPILL_MAX_BYTES``
  5 GiB, a few hours of a fast crawl's items, small next to a crawl machine's disk;
  ``INGEST_SPILL_MIN_FREE_BYTES`` the larger of 1% of the disk and 256 MiB, more than
  the buffer's 64 MiB: the crawl closes while what it holds still fits.
* ``INGEST_VALIDATION``: ``warn``, so that a schema added to a running project
  stores every item (with its errors) instead of dropping some on the first day;
  ``INGEST_KEEP_VERSIONS`` off: history doubles what a changing site stores, and
  is asked for, not assumed.
* ``INGEST_REDIS_LEASES``: on, since a scrapy-redis worker that dies otherwise loses the
  requests it had taken from Redis; ``INGEST_REDIS_LEASE_TIMEOUT`` 30 s: three missed
  refreshes (every 10 s) before another worker takes a silent worker's requests back, long
  enough for a GC pause or a slow Redis, short next to a crawl.
* ``INGEST_SKIP_COMMANDS``: Scrapy's commands that run a spider without being a
  crawl (a shell, one page fetched, contracts checked, a benchmark) store nothing,
  so that the tables hold crawls only; ``parse`` is stored when given
  ``--pipelines``, the one case where Scrapy hands it items.
* ``INGEST_DURABLE``: off: waiting for a disk write per group of items costs an
  item-heavy crawl most of its speed (``docs/performance.md``).
"""

INGEST_ENABLED = True

INGEST_BATCH_BYTES = 4 * 1024 * 1024
INGEST_BATCH_ROWS = 2000
INGEST_CREATE_TABLES = True
INGEST_CRAWL_ID = None
INGEST_DATABASE_URL = "sqlite:///ingest.sqlite3"
INGEST_DURABLE = False
INGEST_FLUSH_INTERVAL = 1.0
INGEST_HASH_EXCLUDE: list[str] = []
INGEST_ITEM_KEYS: dict[str, object] = {}
INGEST_ITEM_SCHEMAS: dict[str, object] = {}
INGEST_JOB_HEARTBEAT = 10.0
INGEST_JOB_ID = None
INGEST_KEEP_VERSIONS = False
INGEST_LOG_LEVEL = "INFO"
INGEST_LOGS_ENABLED = True
INGEST_MAX_BUFFER_BYTES = 64 * 1024 * 1024
INGEST_METRICS_ENABLED = False
INGEST_METRICS_HOST = "127.0.0.1"
INGEST_METRICS_LABELS: dict[str, str] = {}
INGEST_METRICS_PORT = [9410, 9440]
INGEST_METRICS_PUSH_INTERVAL = 15.0
INGEST_METRICS_PUSHGATEWAY = None
INGEST_METRICS_UNHEALTHY_AFTER = 30.0
INGEST_PROXY_ALL_DEAD_TIMEOUT = 300.0
INGEST_PROXY_BACKOFF_BASE = 60.0
INGEST_PROXY_BACKOFF_MAX = 1800.0
INGEST_PROXY_BAN_CODES = [403, 407, 429, 503]
INGEST_PROXY_BAN_POLICY = None
INGEST_PROXY_EXCLUSIVE = False
INGEST_PROXY_FILE = None
INGEST_PROXY_LIST: list[str] = []
INGEST_PROXY_MAX_TRIES = 5
INGEST_PROXY_POLICY = "round_robin"
INGEST_PROXY_SESSION_IDLE = 300.0
INGEST_PROXY_STICKY = "none"
INGEST_REDACT_QUERY_PARAMS = [
    "access_token",
    "api_key",
    "apikey",
    "auth",
    "client_secret",
    "key",
    "passwd",
    "password",
    "secret",
    "session",
    "sig",
    "signature",
    "token",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
    "X-Goog-Credential",
    "X-Goog-Signature",
]
INGEST_REDIS_LEASE_TIMEOUT = 30.0
INGEST_REDIS_LEASES = True
INGEST_REQUIRE_BACKEND = False
INGEST_REQUESTS_ENABLED = True
INGEST_REQUESTS_STORE_HEADERS = False
INGEST_RETRY_ENABLED = False
INGEST_RETRY_AFTER_MAX = 300.0
INGEST_RETRY_BACKOFF_BASE = 0.5
INGEST_RETRY_BACKOFF_MAX = 60.0
INGEST_RETRY_TIMEOUT = 60.0
INGEST_ROUTER = None
INGEST_ROUTES = None
INGEST_SKIP_COMMANDS = ["bench", "check", "fetch", "parse", "shell", "view"]
INGEST_SPILL_DIR = None
INGEST_SPILL_MAX_BYTES = 5 * 1024 * 1024 * 1024
INGEST_SPILL_MIN_FREE_BYTES = None
INGEST_TABLE_PREFIX = "ingest_"
INGEST_VALIDATION = "warn"
INGEST_WRITER_PROCESS = True
