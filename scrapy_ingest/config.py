"""The validated view of a crawler's ``INGEST_*`` settings.

:meth:`IngestConfig.from_settings` is called once per crawler. A wrong value
fails the crawl at start with a message that names the setting, the value,
the rule and the fix, e.g.::

    INGEST_BATCH_ROWS (-1) is invalid: it must be a positive integer.
    Fix: set INGEST_BATCH_ROWS to a number of rows, such as 2000.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scrapy_ingest import settings as defaults
from scrapy_ingest._redact import redact_url
from scrapy_ingest.backends import SUPPORTED_SCHEMES, check_url
from scrapy_ingest.exceptions import ConfigError
from scrapy_ingest.router import Rule, parse_routes

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")

# setting suffix -> (rule, fix) used in error messages
_RULES: dict[str, tuple[str, str]] = {
    "enabled": ("it must be a boolean", "set {name} to True or False"),
    "database_url": (
        f"it must be a database URL whose scheme is one of {', '.join(SUPPORTED_SCHEMES)}",
        "set {name} to e.g. 'sqlite:///ingest.sqlite3' or 'postgresql://user:password@host/dbname'",
    ),
    "table_prefix": (
        "it must match [a-z_][a-z0-9_]* (lower-case letters, digits and underscores, "
        "not starting with a digit), at most 40 characters",
        "set {name} to e.g. 'ingest_' or 'shop_'",
    ),
    "create_tables": ("it must be a boolean", "set {name} to True or False"),
    "batch_rows": ("it must be a positive integer", "set {name} to a number of rows, such as 2000"),
    "batch_bytes": (
        "it must be a positive integer",
        "set {name} to a number of bytes, such as 4194304 (4 MiB)",
    ),
    "flush_interval": (
        "it must be a positive number of seconds",
        "set {name} to e.g. 1.0",
    ),
    "max_buffer_bytes": (
        "it must be a positive integer, at least INGEST_BATCH_BYTES",
        "set {name} to a number of bytes, such as 67108864 (64 MiB)",
    ),
    "job_id": (
        "it must be a non-empty string of at most 200 characters, or None",
        "leave {name} unset for a fresh UUID per crawl, or set a unique string",
    ),
    "crawl_id": (
        "it must be a non-empty string of at most 200 characters, or None",
        "leave {name} unset (the job id is used) or set a string shared by all processes",
    ),
    "job_heartbeat": (
        "it must be a positive number of seconds",
        "set {name} to e.g. 10.0",
    ),
    "writer_process": ("it must be a boolean", "set {name} to True or False"),
    "metrics_enabled": ("it must be a boolean", "set {name} to True or False"),
    "metrics_host": ("it must be a host name or IP address", "set {name} to e.g. '127.0.0.1'"),
    "metrics_port": (
        "it must be a port (0 for any free port), a [first, last] range of ports, or False "
        "(no HTTP server, pushes only)",
        "set {name} to e.g. 9410, [9410, 9440] or 0",
    ),
    "metrics_pushgateway": (
        "it must be the http(s) URL of a pushgateway, or None",
        "set {name} to e.g. 'http://pushgateway:9091'",
    ),
    "metrics_push_interval": ("it must be a positive number of seconds", "set {name} to e.g. 15.0"),
    "metrics_labels": (
        "it must be a dict of label names ([a-zA-Z_][a-zA-Z0-9_]*, not 'spider') to strings",
        "set {name} to e.g. {{'team': 'pricing'}}",
    ),
    "metrics_unhealthy_after": (
        "it must be a positive number of seconds",
        "set {name} to e.g. 30.0",
    ),
    "requests_enabled": ("it must be a boolean", "set {name} to True or False"),
    "requests_store_headers": ("it must be a boolean", "set {name} to True or False"),
    "logs_enabled": ("it must be a boolean", "set {name} to True or False"),
    "log_level": (
        "it must be a logging level: a name (DEBUG, INFO, WARNING, ERROR, CRITICAL) or a "
        "number from 0 to 50",
        "set {name} to e.g. 'INFO' or logging.WARNING",
    ),
    "retry_timeout": (
        "it must be a number of seconds, 0 or more",
        "set {name} to e.g. 60.0",
    ),
}

#: label names the metrics use themselves
_RESERVED_LABELS = frozenset(
    {"spider", "backend", "table", "stat", "reason", "kind", "status_class", "exception"}
)

_Id = Field(default=None, min_length=1, max_length=200)


class IngestConfig(BaseModel):
    """Validated ``INGEST_*`` settings of one crawler (field ``x`` is ``INGEST_X``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool
    database_url: str
    table_prefix: str
    create_tables: bool
    batch_rows: int = Field(gt=0)
    batch_bytes: int = Field(gt=0)
    flush_interval: float = Field(gt=0)
    max_buffer_bytes: int = Field(gt=0)
    job_id: str | None = _Id
    crawl_id: str | None = _Id
    job_heartbeat: float = Field(gt=0)
    retry_timeout: float = Field(ge=0)
    writer_process: bool
    #: as given; see :meth:`rules`
    routes: Any = None
    #: an import path or a class; see :mod:`scrapy_ingest.router`
    router: Any = None
    metrics_enabled: bool
    metrics_host: str = Field(min_length=1)
    #: [first, last] ports, or None
    metrics_port: list[int] | None
    metrics_pushgateway: str | None
    metrics_push_interval: float = Field(gt=0)
    metrics_labels: dict[str, str]
    metrics_unhealthy_after: float = Field(gt=0)
    requests_enabled: bool
    requests_store_headers: bool
    logs_enabled: bool
    #: the level as a number (a name given in the setting is turned into one)
    log_level: int

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            check_url(value)
        except ConfigError:
            raise ValueError("unsupported scheme") from None
        return value

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _check_port(cls, value: Any) -> list[int] | None:
        if value is False or (isinstance(value, str) and value.strip().lower() == "false"):
            return None  # no server: pushes only
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in value)
            or not 0 <= value[0] <= value[1] <= 65535
            or (value[0] == 0 and value[1] != 0)
        ):
            raise ValueError("bad port")
        return [value[0], value[1]]

    @field_validator("metrics_pushgateway")
    @classmethod
    def _check_gateway(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError("bad pushgateway URL")
        return value

    @field_validator("metrics_labels", mode="before")
    @classmethod
    def _check_labels(cls, value: Any) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("labels must be a dict")
        for name in value:
            if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name):
                raise ValueError("bad label name")
            if name in _RESERVED_LABELS:
                raise ValueError("reserved label")
        return {str(k): str(v) for k, v in value.items()}

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_level(cls, value: Any) -> int:
        if isinstance(value, str) and not value.strip().isdigit():
            level = logging.getLevelName(value.strip().upper())
            if not isinstance(level, int):
                raise ValueError("unknown level name")
            return level
        if isinstance(value, bool):
            raise ValueError("a boolean is no level")
        number = int(value)
        if not 0 <= number <= logging.CRITICAL:
            raise ValueError("level out of range")
        return number

    @field_validator("table_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value) or len(value) > 40:
            raise ValueError("bad prefix")
        return value

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> IngestConfig:
        """Build the config from *settings*; raise :class:`ConfigError` on bad values."""
        raw = {
            name: settings.get(setting_name(name), getattr(defaults, setting_name(name)))
            for name in cls.model_fields
        }
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, raw)) from None
        config.rules()  # a wrong route fails here, at start, like any other setting
        if config.router is not None and not isinstance(config.router, (str, type)):
            raise ConfigError(
                f"INGEST_ROUTER ({config.router!r}) is invalid: it must be the import path of a "
                "class, or the class. Fix: e.g. INGEST_ROUTER = 'myproject.routing.ShopRouter'."
            )
        if config.max_buffer_bytes < config.batch_bytes:
            raise ConfigError(
                _message("max_buffer_bytes", config.max_buffer_bytes)
                + f" (INGEST_BATCH_BYTES is {config.batch_bytes})"
            )
        return config

    def rules(self) -> tuple[Rule, ...]:
        """``INGEST_ROUTES`` as routing rules (raise ConfigError when it is wrong)."""
        return parse_routes(self.routes, check_url)


def setting_name(field: str) -> str:
    """``batch_rows`` -> ``INGEST_BATCH_ROWS``."""
    return f"INGEST_{field.upper()}"


def _message(field: str, value: Any) -> str:
    rule, fix = _RULES[field]
    shown = redact_url(value) if field == "database_url" and isinstance(value, str) else value
    name = setting_name(field)
    return f"{name} ({shown!r}) is invalid: {rule}. Fix: {fix.format(name=name)}."


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    fields = dict.fromkeys(str(err["loc"][0]) for err in exc.errors() if err["loc"])
    return "\n".join(_message(field, raw.get(field)) for field in fields)
