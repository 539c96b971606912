"""The validated view of a crawler's ``INGEST_*`` settings.

:meth:`IngestConfig.from_settings` is called once per crawler. A wrong value
fails the crawl at start with a message that names the setting, the value,
the rule and the fix, e.g.::

    INGEST_BATCH_ROWS (-1) is invalid: it must be a positive integer.
    Fix: set INGEST_BATCH_ROWS to a number of rows, such as 2000.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scrapy_ingest import settings as defaults
from scrapy_ingest._redact import redact_url, redact_value
from scrapy_ingest.backends import SUPPORTED_SCHEMES, check_url
from scrapy_ingest.downloadermiddlewares._proxypool import check_proxy_url
from scrapy_ingest.exceptions import ConfigError
from scrapy_ingest.router import Rule, parse_routes

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

#: the attribute of a Settings object that keeps its IngestConfig, with the values it is of
_KEPT = "_scrapy_ingest_config"
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
        "leave {name} unset (the job id, or scrapy-redis's queue key) or set a string shared "
        "by all processes",
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
    "retry_enabled": ("it must be a boolean", "set {name} to True or False"),
    "retry_backoff_base": (
        "it must be a positive number of seconds",
        "set {name} to e.g. 0.5",
    ),
    "retry_backoff_max": (
        "it must be a positive number of seconds, at least INGEST_RETRY_BACKOFF_BASE",
        "set {name} to e.g. 60.0",
    ),
    "retry_after_max": (
        "it must be a number of seconds, 0 or more",
        "set {name} to e.g. 300.0",
    ),
    "redis_leases": ("it must be a boolean", "set {name} to True or False"),
    "redis_lease_timeout": (
        "it must be a positive number of seconds",
        "set {name} to e.g. 30.0",
    ),
    "require_backend": ("it must be a boolean", "set {name} to True or False"),
    "durable": ("it must be a boolean", "set {name} to True or False"),
    "spill_dir": (
        "it must be a directory path, or None (a directory in the project's .scrapy/)",
        "set {name} to e.g. '/var/lib/scraping/spill'",
    ),
    "spill_max_bytes": (
        "it must be a positive integer",
        "set {name} to a number of bytes, such as 5368709120 (5 GiB)",
    ),
    "spill_min_free_bytes": (
        "it must be a number of bytes, 0 or more, or None (the larger of 1% of the disk and "
        "256 MiB)",
        "set {name} to e.g. 1073741824 (1 GiB), 0 to turn the check off, or None",
    ),
    "proxy_list": (
        "it must be a list of proxy URLs",
        "set {name} to e.g. ['http://user:password@proxy1:3128', 'http://proxy2:3128']",
    ),
    "proxy_file": (
        "it must be the path of a text file with one proxy URL per line, or None",
        "set {name} to e.g. 'proxies.txt'",
    ),
    "proxy_policy": (
        "it must be 'round_robin', 'random' or 'least_used'",
        "set {name} to e.g. 'round_robin'",
    ),
    "proxy_sticky": (
        "it must be 'none', 'domain' or 'cookiejar'",
        "set {name} to e.g. 'domain'",
    ),
    "proxy_exclusive": ("it must be a boolean", "set {name} to True or False"),
    "proxy_session_idle": ("it must be a positive number of seconds", "set {name} to e.g. 300.0"),
    "proxy_ban_codes": (
        "it must be a list of HTTP status codes (100 to 599)",
        "set {name} to e.g. [403, 407, 429, 503]",
    ),
    "proxy_ban_policy": (
        "it must be the import path of a class with response_is_ban(request, response) and "
        "exception_is_ban(request, exception) methods, the class, or None",
        "set {name} to e.g. 'myproject.proxies.BanPolicy'",
    ),
    "proxy_max_tries": ("it must be a positive integer", "set {name} to e.g. 5"),
    "proxy_backoff_base": ("it must be a positive number of seconds", "set {name} to e.g. 60.0"),
    "proxy_backoff_max": (
        "it must be a number of seconds, at least INGEST_PROXY_BACKOFF_BASE",
        "set {name} to e.g. 1800.0",
    ),
    "item_schemas": (
        "it must be a dict of item type (class name or import path) to the import path of a "
        "pydantic model (or the model)",
        "set {name} to e.g. {{'ProductItem': 'myproject.schemas.Product'}}",
    ),
    "validation": (
        "it must be 'off', 'warn' or 'strict'",
        "set {name} to e.g. 'warn'",
    ),
    "item_keys": (
        "it must be a dict of item type (class name or import path) to a tuple of field "
        "names, or to the import path of a function of the item that returns its key",
        "set {name} to e.g. {{'ProductItem': ('sku',)}}",
    ),
    "hash_exclude": (
        "it must be a list of field names",
        "set {name} to e.g. ['scraped_at', 'crawled_at']",
    ),
    "keep_versions": ("it must be a boolean", "set {name} to True or False"),
    "redact_query_params": (
        "it must be a list of query parameter names",
        "set {name} to e.g. [*scrapy_ingest.settings.INGEST_REDACT_QUERY_PARAMS, 'my_token']",
    ),
    "skip_commands": (
        "it must be a list of Scrapy command names",
        "set {name} to e.g. ['bench', 'check', 'fetch', 'shell', 'view']",
    ),
    "proxy_all_dead_timeout": (
        "it must be a positive number of seconds",
        "set {name} to e.g. 300.0",
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
    retry_enabled: bool
    retry_backoff_base: float = Field(gt=0)
    retry_backoff_max: float = Field(gt=0)
    retry_after_max: float = Field(ge=0)
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
    redis_leases: bool
    redis_lease_timeout: float = Field(gt=0)
    require_backend: bool
    durable: bool
    spill_dir: str | None = Field(min_length=1)
    spill_max_bytes: int = Field(gt=0)
    spill_min_free_bytes: int | None = Field(ge=0)
    proxy_list: list[str]
    proxy_file: str | None = Field(min_length=1)
    proxy_policy: Literal["round_robin", "random", "least_used"]
    proxy_sticky: Literal["none", "domain", "cookiejar"]
    proxy_exclusive: bool
    proxy_session_idle: float = Field(gt=0)
    proxy_ban_codes: frozenset[int]
    #: an import path or a class
    proxy_ban_policy: Any = None
    proxy_max_tries: int = Field(gt=0)
    proxy_backoff_base: float = Field(gt=0)
    proxy_backoff_max: float = Field(gt=0)
    proxy_all_dead_timeout: float = Field(gt=0)
    #: item type -> model (import path or class); checked by scrapy_ingest.quality
    item_schemas: dict[str, Any]
    validation: Literal["off", "warn", "strict"]
    #: item type -> field names, or a function (import path or callable)
    item_keys: dict[str, Any]
    hash_exclude: frozenset[str]
    skip_commands: frozenset[str]
    redact_query_params: frozenset[str]
    keep_versions: bool

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

    @field_validator("routes", mode="before")
    @classmethod
    def _parse_routes(cls, value: Any) -> Any:
        # from the command line: -s INGEST_ROUTES='{"items": "postgresql://..."}'
        if isinstance(value, str) and value.strip()[:1] in ("{", "["):
            try:
                return json.loads(value)
            except ValueError:
                return value  # parse_routes says what is wrong with it
        return value

    @field_validator("item_schemas", "item_keys", mode="before")
    @classmethod
    def _parse_mapping(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, str):  # from the command line, as JSON
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("not JSON") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.strip() for k in value):
            raise ValueError("not a dict of item types")
        return value

    @field_validator("hash_exclude", "skip_commands", "redact_query_params", mode="before")
    @classmethod
    def _check_names(cls, value: Any) -> frozenset[str]:
        names = names_setting(value)
        if names is None:
            raise ValueError("not a list of names")
        return names

    @field_validator("proxy_list", mode="before")
    @classmethod
    def _check_proxies(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):  # from the command line: -s INGEST_PROXY_LIST=a,b
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError("not a list")
        return list(value)  # each URL is checked in from_settings, to name the one at fault

    @field_validator("proxy_ban_codes", mode="before")
    @classmethod
    def _check_codes(cls, value: Any) -> frozenset[int]:
        if isinstance(value, str):
            value = value.split(",")
        codes = {int(code) for code in value}
        if not all(100 <= code <= 599 for code in codes):
            raise ValueError("status out of range")
        return frozenset(codes)

    @field_validator("table_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value) or len(value) > 40:
            raise ValueError("bad prefix")
        return value

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> IngestConfig:
        """The config of *settings*; raise :class:`ConfigError` on bad values.

        Validated once per crawler: the config is kept on *settings* with the values it was
        made from, and given again while they are the same (each component of a crawler
        gets the same one)."""
        raw = {
            name: settings.get(setting_name(name), getattr(defaults, setting_name(name)))
            for name in cls.model_fields
        }
        kept: tuple[dict[str, Any], IngestConfig] | None = settings.__dict__.get(_KEPT)
        if kept is not None and kept[0] == raw:
            return kept[1]
        config = cls._validate(raw)
        # a copy, so that a list or dict setting changed in place is seen as changed; a value
        # that cannot be copied is validated each time
        with contextlib.suppress(TypeError, copy.Error):
            settings.__dict__[_KEPT] = (copy.deepcopy(raw), config)
        return config

    @classmethod
    def _validate(cls, raw: dict[str, Any]) -> IngestConfig:
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
        for index, url in enumerate(config.proxy_list):
            if reason := check_proxy_url(url):
                shown = redact_url(url) if isinstance(url, str) else url
                raise ConfigError(
                    f"INGEST_PROXY_LIST[{index}] ({shown!r}) is invalid: {reason}. Fix: write "
                    "it as scheme://[user:password@]host:port, e.g. 'http://proxy1:3128'."
                )
        if config.proxy_ban_policy is not None and not isinstance(
            config.proxy_ban_policy, (str, type)
        ):
            raise ConfigError(_message("proxy_ban_policy", config.proxy_ban_policy))
        if config.proxy_backoff_max < config.proxy_backoff_base:
            raise ConfigError(
                _message("proxy_backoff_max", config.proxy_backoff_max)
                + f" (INGEST_PROXY_BACKOFF_BASE is {config.proxy_backoff_base})"
            )
        if config.retry_backoff_max < config.retry_backoff_base:
            raise ConfigError(
                _message("retry_backoff_max", config.retry_backoff_max)
                + f" (INGEST_RETRY_BACKOFF_BASE is {config.retry_backoff_base})"
            )
        if config.max_buffer_bytes < config.batch_bytes:
            raise ConfigError(
                _message("max_buffer_bytes", config.max_buffer_bytes)
                + f" (INGEST_BATCH_BYTES is {config.batch_bytes})"
            )
        return config

    def spill_root(self) -> str:
        """Where the spill journals live: ``INGEST_SPILL_DIR``, else ``ingest-spill`` in the
        project's data directory (``.scrapy/``), as an absolute path."""
        if self.spill_dir:
            return os.path.abspath(self.spill_dir)
        return os.path.abspath(os.path.join(_project_data_dir(), "ingest-spill"))

    def record_kinds(self) -> tuple[str, ...]:
        """The kinds of records a crawl stores: items, and requests and logs if enabled."""
        enabled = {"items": True, "requests": self.requests_enabled, "logs": self.logs_enabled}
        return tuple(kind for kind, on in enabled.items() if on)

    def rules(self) -> tuple[Rule, ...]:
        """``INGEST_ROUTES`` as routing rules (raise ConfigError when it is wrong)."""
        return parse_routes(self.routes, check_url)


def _project_data_dir() -> str:
    """The directory Scrapy's ``data_path()`` puts its data in (``.scrapy`` beside
    ``scrapy.cfg``, or the ``[datadir]`` of ``scrapy.cfg``; ``.scrapy`` outside a project),
    without creating it as ``data_path()`` does: the journal creates it when it writes a batch,
    so a crawl that spills nothing leaves no empty ``.scrapy/`` behind."""
    from scrapy.utils.conf import closest_scrapy_cfg, get_config
    from scrapy.utils.project import DATADIR_CFG_SECTION, inside_project

    if not inside_project():
        return ".scrapy"
    config = get_config()
    if config.has_option(DATADIR_CFG_SECTION, "default"):
        return config.get(DATADIR_CFG_SECTION, "default")
    scrapy_cfg = closest_scrapy_cfg()
    if not scrapy_cfg:  # a settings module, but no scrapy.cfg to find its project by
        return ".scrapy"
    return os.path.join(os.path.dirname(scrapy_cfg), ".scrapy")


def names_setting(value: Any) -> frozenset[str] | None:
    """A setting that lists names, as a set: from a list, or from the command line's
    ``-s NAME=a,b``; None when it is neither."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(v, str) for v in value
    ):
        return None
    return frozenset(value)


def skipped_command(settings: BaseSettings) -> str | None:
    """The ``scrapy`` command this process runs, when ``INGEST_SKIP_COMMANDS`` says that it
    stores nothing (``parse`` only without ``--pipelines``); else None."""
    from scrapy_ingest._compat import scrapy_command

    command = scrapy_command()
    if command is None:
        return None
    name, args = command
    skip = names_setting(settings.get("INGEST_SKIP_COMMANDS", defaults.INGEST_SKIP_COMMANDS))
    if not skip or name not in skip:  # an invalid value is reported by IngestConfig
        return None
    if name == "parse" and "--pipelines" in args:
        return None
    return name


def setting_name(field: str) -> str:
    """``batch_rows`` -> ``INGEST_BATCH_ROWS``."""
    return f"INGEST_{field.upper()}"


def _message(field: str, value: Any) -> str:
    rule, fix = _RULES[field]
    name = setting_name(field)
    shown = redact_value(name, value)  # a database or proxy URL may carry a password
    return f"{name} ({shown!r}) is invalid: {rule}. Fix: {fix.format(name=name)}."


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    fields = dict.fromkeys(str(err["loc"][0]) for err in exc.errors() if err["loc"])
    return "\n".join(_message(field, raw.get(field)) for field in fields)
