"""IngestConfig.from_settings: defaults, conversion of command-line strings, and a ConfigError
that names the setting, the value, the rule and the fix for every bad value."""

from __future__ import annotations

import logging
import traceback
from typing import TYPE_CHECKING, Any

import pytest
from scrapy.settings import Settings

from scrapy_ingest import settings as defaults
from scrapy_ingest.config import IngestConfig
from scrapy_ingest.exceptions import ConfigError, IngestError

if TYPE_CHECKING:
    from pathlib import Path


def _config(values: dict[str, Any] | None = None) -> IngestConfig:
    return IngestConfig.from_settings(Settings(values or {}))


def test_defaults() -> None:
    config = _config()
    assert config.enabled is True
    assert config.database_url == defaults.INGEST_DATABASE_URL == "sqlite:///ingest.sqlite3"
    assert config.table_prefix == "ingest_"
    assert config.create_tables is True
    assert config.batch_rows == defaults.INGEST_BATCH_ROWS
    assert config.batch_bytes == defaults.INGEST_BATCH_BYTES
    assert config.flush_interval == defaults.INGEST_FLUSH_INTERVAL
    assert config.max_buffer_bytes == defaults.INGEST_MAX_BUFFER_BYTES
    assert config.job_id is None
    assert config.crawl_id is None
    assert config.job_heartbeat == defaults.INGEST_JOB_HEARTBEAT
    assert config.retry_timeout == defaults.INGEST_RETRY_TIMEOUT
    assert config.max_buffer_bytes >= config.batch_bytes
    assert config.requests_enabled is True
    assert config.requests_store_headers is False
    assert config.logs_enabled is True
    assert config.log_level == logging.INFO


def test_project_values_are_used() -> None:
    config = _config(
        {
            "INGEST_DATABASE_URL": "postgresql://u:pw@db:5433/scraping",
            "INGEST_TABLE_PREFIX": "shop_",
            "INGEST_BATCH_ROWS": 10,
            "INGEST_JOB_ID": "job-1",
            "INGEST_CRAWL_ID": "crawl-1",
            "INGEST_RETRY_TIMEOUT": 0,
        }
    )
    assert config.database_url == "postgresql://u:pw@db:5433/scraping"
    assert config.table_prefix == "shop_"
    assert config.batch_rows == 10
    assert (config.job_id, config.crawl_id) == ("job-1", "crawl-1")
    assert config.retry_timeout == 0


def test_command_line_strings_are_converted() -> None:
    # `scrapy crawl -s INGEST_BATCH_ROWS=100` gives strings
    settings = Settings()
    settings.setdict(
        {
            "INGEST_BATCH_ROWS": "100",
            "INGEST_BATCH_BYTES": "65536",
            "INGEST_MAX_BUFFER_BYTES": "1048576",
            "INGEST_FLUSH_INTERVAL": "0.5",
            "INGEST_JOB_HEARTBEAT": "2",
            "INGEST_RETRY_TIMEOUT": "0",
            "INGEST_ENABLED": "false",
            "INGEST_CREATE_TABLES": "False",
        },
        priority="cmdline",
    )
    config = IngestConfig.from_settings(settings)
    assert config.batch_rows == 100
    assert config.batch_bytes == 65536
    assert config.max_buffer_bytes == 1048576
    assert config.flush_interval == 0.5
    assert config.job_heartbeat == 2.0
    assert config.retry_timeout == 0.0
    assert config.enabled is False
    assert config.create_tables is False


@pytest.mark.parametrize("text", ["true", "True", "1"])
def test_command_line_true(text: str) -> None:
    assert _config({"INGEST_ENABLED": "false", "INGEST_CREATE_TABLES": text}).create_tables is True


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///ingest.sqlite3",
        "sqlite:////abs/path/x.db",
        "postgresql://u:p@h/db",
        "postgres://u@h:5433/db",
        "postgresql+psycopg://u:p@h/db",
    ],
)
def test_supported_database_urls(url: str) -> None:
    assert _config({"INGEST_DATABASE_URL": url}).database_url == url


BAD_VALUES = [
    ("INGEST_BATCH_ROWS", -1, "-1"),
    ("INGEST_BATCH_ROWS", 0, "0"),
    ("INGEST_BATCH_ROWS", "abc", "'abc'"),
    ("INGEST_BATCH_ROWS", 1.5, "1.5"),
    ("INGEST_BATCH_BYTES", -5, "-5"),
    ("INGEST_TABLE_PREFIX", "Bad-Prefix", "'Bad-Prefix'"),
    ("INGEST_TABLE_PREFIX", "1abc", "'1abc'"),
    ("INGEST_TABLE_PREFIX", "x" * 41, "'" + "x" * 41 + "'"),
    ("INGEST_TABLE_PREFIX", 'a"; DROP TABLE x; --', "DROP TABLE"),
    ("INGEST_DATABASE_URL", "mongodb://x", "'mongodb://x'"),
    ("INGEST_DATABASE_URL", "ingest.sqlite3", "'ingest.sqlite3'"),
    ("INGEST_FLUSH_INTERVAL", 0, "0"),
    ("INGEST_FLUSH_INTERVAL", -1.0, "-1.0"),
    ("INGEST_JOB_HEARTBEAT", 0, "0"),
    ("INGEST_RETRY_TIMEOUT", -1, "-1"),
    ("INGEST_JOB_ID", "", "''"),
    ("INGEST_CRAWL_ID", "c" * 201, "'" + "c" * 201 + "'"),
    ("INGEST_CREATE_TABLES", "maybe", "'maybe'"),
    ("INGEST_ENABLED", "sometimes", "'sometimes'"),
    ("INGEST_REDIS_LEASES", "maybe", "'maybe'"),
    ("INGEST_REDIS_LEASE_TIMEOUT", 0, "0"),
    ("INGEST_REDIS_LEASE_TIMEOUT", "soon", "'soon'"),
]


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    BAD_VALUES,
    ids=[f"{name}={str(value)[:20]}" for name, value, _ in BAD_VALUES],
)
def test_bad_value_names_setting_value_rule_and_fix(name: str, value: Any, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config({name: value})
    message = str(info.value)
    assert f"{name} (" in message
    assert shown in message
    assert "must" in message
    assert "Fix:" in message
    # the fix names the setting to change
    assert name in message.split("Fix:", 1)[1]


def test_config_error_is_an_ingest_error_and_a_value_error() -> None:
    with pytest.raises(ConfigError) as info:
        _config({"INGEST_BATCH_ROWS": -1})
    assert isinstance(info.value, IngestError)
    assert isinstance(info.value, ValueError)


def test_max_buffer_smaller_than_batch_bytes() -> None:
    with pytest.raises(ConfigError) as info:
        _config({"INGEST_BATCH_BYTES": 1024 * 1024, "INGEST_MAX_BUFFER_BYTES": 1024})
    message = str(info.value)
    assert "INGEST_MAX_BUFFER_BYTES (1024)" in message
    assert "INGEST_BATCH_BYTES" in message
    assert "must" in message
    assert "Fix:" in message


def test_max_buffer_equal_to_batch_bytes_is_fine() -> None:
    config = _config({"INGEST_BATCH_BYTES": 4096, "INGEST_MAX_BUFFER_BYTES": 4096})
    assert config.max_buffer_bytes == config.batch_bytes == 4096


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        _config(
            {
                "INGEST_BATCH_ROWS": 0,
                "INGEST_TABLE_PREFIX": "Bad-Prefix",
                "INGEST_FLUSH_INTERVAL": 0,
            }
        )
    message = str(info.value)
    for name in ("INGEST_BATCH_ROWS", "INGEST_TABLE_PREFIX", "INGEST_FLUSH_INTERVAL"):
        assert f"{name} (" in message
    assert message.count("Fix:") == 3


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://scraper:hunter2@db.example/scraping",
        "cassandra://scraper:hunter2@[db/scraping",  # not even a valid URL
        "redis://:hunter2@cache:6379/0",
    ],
)
def test_bad_database_url_message_hides_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config({"INGEST_DATABASE_URL": url})
    message = str(info.value)
    assert "INGEST_DATABASE_URL (" in message
    assert "must" in message
    assert "Fix:" in message
    assert "hunter2" not in message
    assert "scraper:***@" in message or ":***@" in message
    # nor anywhere in what a traceback would print (chained pydantic errors show the input)
    assert "hunter2" not in "".join(traceback.format_exception(info.value))


def test_password_does_not_leak_through_another_settings_error() -> None:
    url = "postgresql://scraper:hunter2@db/scraping"
    with pytest.raises(ConfigError) as info:
        _config({"INGEST_DATABASE_URL": url, "INGEST_BATCH_ROWS": -1})
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize(
    ("value", "level"),
    [("DEBUG", 10), ("warning", 30), (" ERROR ", 40), (25, 25), ("30", 30), (logging.CRITICAL, 50)],
)
def test_log_level_by_name_or_number(value: Any, level: int) -> None:
    assert _config({"INGEST_LOG_LEVEL": value}).log_level == level


@pytest.mark.parametrize("value", ["VERBOSE", "", -1, 51, True, "Level 5"])
def test_bad_log_level_is_named_with_the_fix(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        _config({"INGEST_LOG_LEVEL": value})
    message = str(info.value)
    assert message.startswith(
        f"INGEST_LOG_LEVEL ({value!r}) is invalid: it must be a logging level"
    )
    assert "Fix: set INGEST_LOG_LEVEL to e.g. 'INFO'" in message


def test_other_sqlalchemy_urls_are_taken_on_a_best_effort_basis() -> None:
    url = "mssql+pyodbc://scraper:pw@db/scraping?driver=ODBC+Driver+18+for+SQL+Server"
    assert _config({"INGEST_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("value", "ports"),
    [(0, [0, 0]), (9410, [9410, 9410]), ([9410, 9440], [9410, 9440]), ("9411", [9411, 9411]),
     (False, None), ("false", None)],
)  # fmt: skip
def test_metrics_port_by_number_or_range(value: Any, ports: list[int] | None) -> None:
    assert _config({"INGEST_METRICS_PORT": value}).metrics_port == ports


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INGEST_METRICS_PORT", [9440, 9410]),
        ("INGEST_METRICS_PORT", 70000),
        ("INGEST_METRICS_PORT", [0, 10]),
        ("INGEST_METRICS_PORT", "http"),
        ("INGEST_METRICS_PUSHGATEWAY", "pushgateway:9091"),
        ("INGEST_METRICS_LABELS", {"spider": "x"}),
        ("INGEST_METRICS_LABELS", {"bad-name": "x"}),
        ("INGEST_METRICS_PUSH_INTERVAL", 0),
        ("INGEST_METRICS_UNHEALTHY_AFTER", -1),
    ],
)
def test_bad_metrics_settings_are_named_with_the_fix(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        _config({name: value})
    assert str(info.value).startswith(f"{name} ({value!r}) is invalid:")
    assert "Fix:" in str(info.value)


def test_the_spill_root_is_named_without_creating_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scrapy's data_path() creates .scrapy/ (and two crawls of one fresh project starting together
    # raced to create it); the journal's directory is made only when a batch is first spilled
    (tmp_path / "scrapy.cfg").write_text("[settings]\ndefault = project.settings\n")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "__init__.py").write_text("")
    (tmp_path / "project" / "settings.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCRAPY_SETTINGS_MODULE", "project.settings")
    data_dir = tmp_path / ".scrapy"
    config = IngestConfig.from_settings(Settings())
    assert config.spill_root() == str(data_dir / "ingest-spill")
    assert not data_dir.exists()


def test_the_config_is_validated_once_per_crawler(monkeypatch: pytest.MonkeyPatch) -> None:
    from scrapy import Spider
    from scrapy.utils.test import get_crawler

    from scrapy_ingest.downloadermiddlewares.proxy import ProxyMiddleware
    from scrapy_ingest.downloadermiddlewares.retry import BackoffRetryMiddleware
    from scrapy_ingest.runtime import IngestRuntime

    validated: list[dict[str, Any]] = []
    validate = IngestConfig._validate.__func__  # type: ignore[attr-defined]

    def counting(cls: type[IngestConfig], raw: dict[str, Any]) -> IngestConfig:
        validated.append(raw)
        return validate(cls, raw)  # type: ignore[no-any-return]

    monkeypatch.setattr(IngestConfig, "_validate", classmethod(counting))
    crawler = get_crawler(
        Spider,
        {
            "ADDONS": {"scrapy_ingest.IngestAddon": 0},
            "INGEST_DATABASE_URL": "sqlite:///:memory:",
            "INGEST_PROXY_LIST": ["http://127.0.0.1:3128"],
            "RETRY_ENABLED": True,
        },
    )
    crawler._apply_settings()  # what Crawler.crawl() does first: add-ons, then frozen
    assert crawler.settings.frozen
    runtime = IngestRuntime.of(crawler)
    ProxyMiddleware.from_crawler(crawler)
    retry = BackoffRetryMiddleware.from_crawler(crawler)
    assert retry._base == runtime.config.retry_backoff_base
    assert IngestConfig.from_settings(crawler.settings) is runtime.config
    assert len(validated) == 1


def test_changed_settings_are_validated_again() -> None:
    settings = Settings({"INGEST_BATCH_ROWS": 10, "INGEST_PROXY_LIST": []})
    assert IngestConfig.from_settings(settings).batch_rows == 10
    settings.set("INGEST_BATCH_ROWS", 20)
    assert IngestConfig.from_settings(settings).batch_rows == 20
    settings["INGEST_PROXY_LIST"].append("http://127.0.0.1:3128")  # in place
    assert IngestConfig.from_settings(settings).proxy_list == ["http://127.0.0.1:3128"]
    settings.set("INGEST_BATCH_ROWS", -1)
    with pytest.raises(ConfigError, match="INGEST_BATCH_ROWS"):
        IngestConfig.from_settings(settings)
