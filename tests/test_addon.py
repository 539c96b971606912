"""IngestAddon enables the stack without overriding the project; _redact keeps credentials out
of what is stored or logged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from scrapy.logformatter import LogFormatter
from scrapy.pipelines import ItemPipelineManager
from scrapy.utils.misc import build_from_crawler, load_object
from scrapy.utils.test import get_crawler

from scrapy_ingest import (
    IngestAddon,
    IngestJobsExtension,
    IngestLogFormatter,
    IngestLogsExtension,
    IngestPipeline,
    PrometheusExtension,
    RequestLogMiddleware,
    SourceMiddleware,
)
from scrapy_ingest._redact import REDACTED, redact_text, redact_url, redact_value
from scrapy_ingest.pipelines import IngestItemProcessor
from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from pathlib import Path

    from scrapy.crawler import Crawler

COMPONENTS = [
    ("ITEM_PIPELINES", IngestPipeline, 900),
    ("EXTENSIONS", IngestJobsExtension, 500),
    ("EXTENSIONS", IngestLogsExtension, 500),
    ("DOWNLOADER_MIDDLEWARES", RequestLogMiddleware, 950),
    ("SPIDER_MIDDLEWARES", SourceMiddleware, 10),
]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    # building the components must not touch this file (nothing opens before the crawl)
    return f"sqlite:///{tmp_path / 'ingest.sqlite3'}"


def _crawler(db_url: str, **settings: Any) -> Crawler:
    return get_crawler(
        settings_dict={"ADDONS": {IngestAddon: 300}, "INGEST_DATABASE_URL": db_url, **settings}
    )


def _components(crawler: Crawler, setting: str) -> dict[Any, Any]:
    """The setting's dict with keys loaded, so class and import-path keys compare equal."""
    return {
        (load_object(k) if isinstance(k, str) else k): v
        for k, v in crawler.settings.getdict(setting).items()
    }


@pytest.mark.parametrize(("setting", "component", "order"), COMPONENTS)
def test_addon_enables_component(db_url: str, setting: str, component: type, order: int) -> None:
    crawler = _crawler(db_url)
    assert crawler.settings.frozen
    assert _components(crawler, setting)[component] == order


def test_addon_by_import_path(db_url: str) -> None:
    crawler = get_crawler(
        settings_dict={"ADDONS": {"scrapy_ingest.IngestAddon": 300}, "INGEST_DATABASE_URL": db_url}
    )
    for setting, component, order in COMPONENTS:
        assert _components(crawler, setting)[component] == order


def test_addon_builds_the_jobs_extension(db_url: str, tmp_path: Path) -> None:
    crawler = _crawler(db_url)
    assert crawler.extensions is not None
    assert any(isinstance(m, IngestJobsExtension) for m in crawler.extensions.middlewares)
    assert not (tmp_path / "ingest.sqlite3").exists()


@pytest.mark.parametrize(("setting", "component"), [c[:2] for c in COMPONENTS])
@pytest.mark.parametrize("key_form", ["path", "class"])
@pytest.mark.parametrize("project_value", [123, None])
def test_project_setting_wins(
    db_url: str, setting: str, component: type, key_form: str, project_value: int | None
) -> None:
    key: Any = component if key_form == "class" else f"scrapy_ingest.{component.__name__}"
    crawler = _crawler(db_url, **{setting: {key: project_value}})
    ours = {c: order for s, c, order in COMPONENTS if s == setting and c is not component}
    assert _components(crawler, setting) == {component: project_value, **ours}


def test_project_components_are_kept_next_to_ours(db_url: str) -> None:
    crawler = _crawler(db_url, ITEM_PIPELINES={"scrapy.pipelines.images.ImagesPipeline": None})
    pipelines = _components(crawler, "ITEM_PIPELINES")
    assert pipelines[IngestPipeline] == 900
    assert pipelines[load_object("scrapy.pipelines.images.ImagesPipeline")] is None


def test_addon_sets_the_item_processor(db_url: str) -> None:
    crawler = _crawler(db_url)
    assert load_object(crawler.settings["ITEM_PROCESSOR"]) is IngestItemProcessor


class ProjectItemProcessor(ItemPipelineManager):
    pass


@pytest.mark.parametrize(
    "processor", [ProjectItemProcessor, "scrapy.pipelines.ItemPipelineManager"]
)
def test_a_project_item_processor_wins(db_url: str, processor: Any) -> None:
    # even Scrapy's own, set by the project, is kept
    crawler = _crawler(db_url, ITEM_PROCESSOR=processor)
    assert crawler.settings["ITEM_PROCESSOR"] == processor


def test_no_item_processor_without_the_pipeline(db_url: str) -> None:
    crawler = _crawler(db_url, ITEM_PIPELINES={IngestPipeline: None})
    assert crawler.settings["ITEM_PROCESSOR"] == "scrapy.pipelines.ItemPipelineManager"


def test_addon_sets_the_log_formatter(db_url: str) -> None:
    crawler = _crawler(db_url)
    assert load_object(crawler.settings["LOG_FORMATTER"]) is IngestLogFormatter
    assert type(crawler.logformatter) is IngestLogFormatter


class ProjectLogFormatter(LogFormatter):
    pass


@pytest.mark.parametrize("formatter", [ProjectLogFormatter, "scrapy.logformatter.LogFormatter"])
def test_a_project_log_formatter_wins(db_url: str, formatter: Any) -> None:
    # even Scrapy's own, set by the project, is kept
    crawler = _crawler(db_url, LOG_FORMATTER=formatter)
    assert crawler.settings["LOG_FORMATTER"] == formatter
    assert type(crawler.logformatter) is load_object(formatter)


def test_no_log_formatter_when_ingest_is_disabled(db_url: str) -> None:
    crawler = _crawler(db_url, INGEST_ENABLED=False)
    assert type(crawler.logformatter) is LogFormatter


class UpperPipeline:
    def process_item(self, item: Any, spider: Any = None) -> Any:
        return {key.upper(): value for key, value in item.items()}


def _process_item_owners(processor: ItemPipelineManager) -> list[type]:
    """The classes whose process_item the processor's chain calls, in order."""
    return [
        type(getattr(method, "__self__", None) or method.__wrapped__.__self__)
        for method in processor.methods["process_item"]
    ]


def test_the_item_processor_calls_the_last_ingest_pipeline_itself(db_url: str) -> None:
    crawler = _crawler(db_url, ITEM_PIPELINES={UpperPipeline: 100})
    processor = build_from_crawler(IngestItemProcessor, crawler)
    assert _process_item_owners(processor) == [UpperPipeline]
    ingest = next(mw for mw in processor.middlewares if isinstance(mw, IngestPipeline))
    assert processor._capture == ingest.capture


def test_an_ingest_pipeline_followed_by_others_stays_in_the_chain(db_url: str) -> None:
    crawler = _crawler(db_url, ITEM_PIPELINES={UpperPipeline: 950})
    processor = build_from_crawler(IngestItemProcessor, crawler)
    assert _process_item_owners(processor) == [IngestPipeline, UpperPipeline]
    assert processor._capture is None


@pytest.mark.parametrize("enabled", [False, "False", "false", 0])
def test_ingest_disabled_adds_nothing(db_url: str, enabled: Any) -> None:
    crawler = _crawler(db_url, INGEST_ENABLED=enabled)
    for setting, component, _ in COMPONENTS:
        assert component not in _components(crawler, setting)
    assert crawler.extensions is not None
    assert not any(isinstance(m, IngestJobsExtension) for m in crawler.extensions.middlewares)


def test_each_crawler_has_its_own_runtime(db_url: str) -> None:
    first, second = _crawler(db_url), _crawler(db_url, INGEST_BATCH_ROWS=5)
    assert IngestRuntime.of(first) is IngestRuntime.of(first)
    assert IngestRuntime.of(first) is not IngestRuntime.of(second)
    assert IngestRuntime.of(second).config.batch_rows == 5


# _redact


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (
            "postgresql://scraper:hunter2@db/x?password=y",
            "postgresql://scraper:***@db/x?password=***",
        ),
        ("postgresql://scraper:hunter2@db:5433/x", "postgresql://scraper:***@db:5433/x"),
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:hunter2@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        ("postgresql://:hunter2@h/db", "postgresql://:***@h/db"),
        (
            "postgresql://h/db?sslmode=require&password=pw",
            "postgresql://h/db?sslmode=require&password=***",
        ),
        ("https://user:pw@proxy:8080", "https://user:***@proxy:8080"),
        ("http://host/x?token=abc&page=2", "http://host/x?token=***&page=2"),
        ("http://host/x?api_key=abc", "http://host/x?api_key=***"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://scraper@db/x",
        "sqlite:///ingest.sqlite3",
        "sqlite:////tmp/a b/x.db",
        "http://example.com/page?q=shoes&page=2",
    ],
)
def test_redact_url_leaves_urls_without_secrets_alone(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_of_an_unparsable_url() -> None:
    redacted = redact_url("postgresql://u:hunter2@[bad/db")
    assert "hunter2" not in redacted
    assert redacted.startswith("postgresql://u:***@")


def test_redact_text_finds_urls_inside_messages() -> None:
    text = "could not connect to postgresql://u:hunter2@h:5432/db: refused; proxy http://a:b2@c"
    redacted = redact_text(text)
    assert "hunter2" not in redacted
    assert "b2" not in redacted
    assert redacted == (
        "could not connect to postgresql://u:***@h:5432/db: refused; proxy http://a:***@c"
    )


@pytest.mark.parametrize(
    "name",
    [
        "DB_PASSWORD",
        "MY_API_KEY",
        "APIKEY",
        "AWS_SECRET_ACCESS_KEY",
        "GITHUB_TOKEN",
        "HTTP_AUTH",
        "COOKIE_VALUE",
        "ZYTE_CREDENTIALS",
    ],
)
def test_redact_value_hides_secret_named_settings(name: str) -> None:
    assert redact_value(name, "s3cret") == REDACTED
    assert redact_value(name, {"user": "s3cret"}) == REDACTED


@pytest.mark.parametrize("empty", [None, "", False])
def test_redact_value_keeps_unset_secrets_visible_as_unset(empty: Any) -> None:
    assert redact_value("DB_PASSWORD", empty) == empty


def test_redact_value_of_plain_settings() -> None:
    assert redact_value("BOT_NAME", "shop") == "shop"
    assert redact_value("CONCURRENT_REQUESTS", 16) == 16
    assert redact_value("DOWNLOAD_DELAY", 0.5) == 0.5
    assert redact_value("FEEDS", None) is None


def test_redact_value_of_a_database_url() -> None:
    redacted = redact_value("INGEST_DATABASE_URL", "postgresql://u:hunter2@h/db")
    assert redacted == "postgresql://u:***@h/db"


def test_redact_value_of_a_database_url_with_password_in_query() -> None:
    # libpq reads ?password=... as the password, as redact_url knows
    redacted = redact_value("INGEST_DATABASE_URL", "postgresql://u@h/db?password=hunter2")
    assert "hunter2" not in redacted


def test_redact_value_of_headers() -> None:
    headers = {
        "Authorization": "Bearer abc",
        "Proxy-Authorization": "Basic xyz",
        "Cookie": "session=1",
        "Accept": "text/html",
    }
    assert redact_value("DEFAULT_REQUEST_HEADERS", headers) == {
        "Authorization": REDACTED,
        "Proxy-Authorization": REDACTED,
        "Cookie": REDACTED,
        "Accept": "text/html",
    }


def test_redact_value_of_nested_containers() -> None:
    value = {
        "proxies": ["http://u:pw1@p1:1", "http://p2:2"],
        "backend": {"url": "postgresql://u:pw2@h/db", "token": "t0k"},
        "pair": ("https://a:pw3@b", 1),
    }
    redacted = redact_value("MY_COMPONENT", value)
    assert redacted == {
        "proxies": ["http://u:***@p1:1", "http://p2:2"],
        "backend": {"url": "postgresql://u:***@h/db", "token": REDACTED},
        "pair": ["https://a:***@b", 1],
    }
    assert "pw" not in repr(redacted)
    assert value["backend"]["token"] == "t0k"  # the original is left alone


def test_switched_off_components_are_not_placed(db_url: str) -> None:
    crawler = _crawler(db_url)  # metrics are off by default: nothing to say "disabled" about
    assert PrometheusExtension not in _components(crawler, "EXTENSIONS")
    on = _crawler(db_url, INGEST_METRICS_ENABLED=True, INGEST_METRICS_PORT=0)
    assert _components(on, "EXTENSIONS")[PrometheusExtension] == 500
    off = _crawler(db_url, INGEST_REQUESTS_ENABLED=False, INGEST_LOGS_ENABLED="false")
    assert RequestLogMiddleware not in _components(off, "DOWNLOADER_MIDDLEWARES")
    assert IngestLogsExtension not in _components(off, "EXTENSIONS")
