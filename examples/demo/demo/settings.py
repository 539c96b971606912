"""Settings of the demo project.

The ADDONS line is all scrapy_ingest needs: with no INGEST_DATABASE_URL it stores items and
jobs in ``ingest.sqlite3`` in the directory the crawl runs from.
"""

BOT_NAME = "demo"

SPIDER_MODULES = ["demo.spiders"]
NEWSPIDER_MODULE = "demo.spiders"

ADDONS = {"scrapy_ingest.IngestAddon": 300}

# The bundled site is served locally and has no robots.txt.
ROBOTSTXT_OBEY = False
