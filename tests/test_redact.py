"""Credentials never reach a table or a log line, whatever shape the URL has."""

from __future__ import annotations

import pytest

from scrapy_ingest._redact import redact_secrets_of, redact_text, redact_url, redact_value


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:hunter2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:hunter2%zz@h/db", "postgresql://u:***@h/db"),  # not valid %-syntax
        ("postgresql://u:pa/ss@h:5432/db", "postgresql://u:***@h:5432/db"),  # "/" in it
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # "@" in it
        ("postgresql://u:pa ss@h/db", "postgresql://u:***@h/db"),  # a space in it
        ("postgresql://u@h/db?password=x&sslmode=require", None),
        ("sqlite:///ingest.sqlite3", "sqlite:///ingest.sqlite3"),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
)
def test_redact_url(url: str, expected: str | None) -> None:
    redacted = redact_url(url)
    if expected is not None:
        assert redacted == expected
    for secret in ("hunter2", "pa/ss", "p@ss", "pa ss", "password=x"):
        assert secret not in redacted


def test_a_driver_message_quoting_the_password_is_cleaned() -> None:
    url = "postgresql://postgres:hunter2%zz@127.0.0.1/db"
    message = 'invalid percent-encoded token: "hunter2%zz"'
    assert "hunter2" not in redact_secrets_of(url, message)
    decoded = "postgresql://postgres:s%40cret@127.0.0.1/db"
    assert "s@cret" not in redact_secrets_of(decoded, "password for s@cret refused")


def test_urls_in_mapping_keys_are_redacted_and_classes_named() -> None:
    class Pipe:
        pass

    feeds = {"ftp://feeduser:hunter2@ftp.example/items.json": {"format": "json"}}
    redacted = redact_value("FEEDS", feeds)
    assert redacted == {"ftp://feeduser:***@ftp.example/items.json": {"format": "json"}}
    pipelines = redact_value("ITEM_PIPELINES", {Pipe: 300})
    assert pipelines == {f"{__name__}.{Pipe.__qualname__}": 300}


def test_secret_values_in_a_printed_dict_of_settings_are_redacted() -> None:
    # what Scrapy logs as "Overridden settings:" (pprint of a dict)
    text = (
        "Overridden settings:\n{'AWS_SECRET_ACCESS_KEY': 'aws-secret',\n 'API_KEY': \"it's\",\n"
        " 'COOKIES_ENABLED': False,\n 'DB': 'postgresql://u:pw@h/db',\n 'BOT_NAME': 'books'}"
    )
    assert redact_text(text) == (
        "Overridden settings:\n{'AWS_SECRET_ACCESS_KEY': '***',\n 'API_KEY': '***',\n"
        " 'COOKIES_ENABLED': False,\n 'DB': 'postgresql://u:***@h/db',\n 'BOT_NAME': 'books'}"
    )
    assert redact_text("no secret here: 'a': 'b'") == "no secret here: 'a': 'b'"
