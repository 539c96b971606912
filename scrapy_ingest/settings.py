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
  (0.715 with the process). SQLite always writes from a thread.
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
* ``INGEST_REQUESTS_STORE_HEADERS``: off, since headers are most of a request
  row's size and rarely queried.
"""

INGEST_ENABLED = True

INGEST_BATCH_BYTES = 4 * 1024 * 1024
INGEST_BATCH_ROWS = 2000
INGEST_CREATE_TABLES = True
INGEST_CRAWL_ID = None
INGEST_DATABASE_URL = "sqlite:///ingest.sqlite3"
INGEST_FLUSH_INTERVAL = 1.0
INGEST_JOB_HEARTBEAT = 10.0
INGEST_JOB_ID = None
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
INGEST_REQUESTS_ENABLED = True
INGEST_REQUESTS_STORE_HEADERS = False
INGEST_RETRY_TIMEOUT = 60.0
INGEST_ROUTER = None
INGEST_ROUTES = None
INGEST_TABLE_PREFIX = "ingest_"
INGEST_WRITER_PROCESS = True
