"""Settings of a distributed crawl: scrapy-redis shares the frontier, scrapy_ingest stores it.

Every worker process runs ``scrapy crawl books`` with these settings (and its own REDIS_URL and
INGEST_DATABASE_URL, given by run.py with ``-s``).
"""

BOT_NAME = "bookshop"
SPIDER_MODULES = ["bookshop.spiders"]

ADDONS = {"scrapy_ingest.IngestAddon": 300}
INGEST_DATABASE_URL = "sqlite:///ingest.sqlite3"  # in production: one PostgreSQL for all workers

# scrapy-redis: one request queue and one dupefilter in Redis, shared by every worker
SCHEDULER = "scrapy_redis.scheduler.Scheduler"  # the add-on leases its requests (see docs)
DUPEFILTER_CLASS = "scrapy_redis.dupefilter.RFPDupeFilter"
SCHEDULER_PERSIST = True  # a worker that finishes must not flush the queue of the others
REDIS_URL = "redis://127.0.0.1:6379/0"
# a RedisSpider waits for start URLs forever unless told to close when idle
MAX_IDLE_TIME_BEFORE_CLOSE = 5

# INGEST_CRAWL_ID defaults to scrapy-redis's queue key, "books:requests": every worker's job
# row carries it. Set it to tell crawls of the same spider apart (e.g. "books-2026-05-01").

# The bundled site is served locally and has no robots.txt.
ROBOTSTXT_OBEY = False
