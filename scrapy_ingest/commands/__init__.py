"""Scrapy commands of scrapy_ingest (``scrapy ingest ...``), registered through the
``scrapy.commands`` entry point."""
