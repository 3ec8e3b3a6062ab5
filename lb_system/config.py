"""Configuration: config.toml read, validated and resolved into frozen objects."""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import os
import re
import socket
import ssl
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = "config.toml"

# The balancing strategies [balancer] strategy may name (lb_system.balancing.strategies makes them).
STRATEGY_NAMES: tuple[str, ...] = (
    "round_robin",
    "least_connections",
    "power_of_two",
    "random",
    "consistent_hash",
)

# RFC 9110 token characters: what a header field name may contain.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HASH_ON_HELP = "expected 'client_ip', 'path' or 'header:<Name>'"


def validate_hash_on(value: str) -> None:
    """Raise ValueError unless `value` is 'client_ip', 'path' or 'header:<Name>'."""
    if value in ("client_ip", "path"):
        return
    if value.startswith("header:"):
        header = value[len("header:") :]
        if not header:
            raise ValueError(f"invalid hash_on {value!r}: header name is empty; {_HASH_ON_HELP}")
        if not _HEADER_NAME.fullmatch(header):
            raise ValueError(f"invalid hash_on {value!r}: {header!r} is not a valid HTTP header name")
        return
    raise ValueError(f"invalid hash_on {value!r}; {_HASH_ON_HELP}")


def reuse_port_available() -> bool:
    """Whether this platform lets several sockets listen on one port (Linux, the BSDs, macOS; not Windows)."""
    return hasattr(socket, "SO_REUSEPORT") and sys.platform != "win32"


# The one placeholder [log] file may hold: each process of a --processes group writes its own file.
PID_PLACEHOLDER = "{pid}"


def validate_strategy(value: str) -> None:
    """Raise ValueError unless `value` names a balancing strategy."""
    if value not in STRATEGY_NAMES:
        raise ValueError(f"must be one of {', '.join(STRATEGY_NAMES)}, got {value!r}")


def validate_cookie_name(value: str) -> str:
    """A cookie name is an RFC 9110 token (RFC 6265 §4.1.1), 1-64 characters here."""
    if not value or len(value) > 64 or not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"must be a cookie name (1-64 letters, digits or !#$%&'*+-.^_`|~), got {value!r}")
    return value


def _checked(check: Callable[[str], object]) -> AfterValidator:
    """A validator that runs `check` (raising ValueError) and keeps the value."""

    def validate(value: str) -> str:
        check(value)
        return value

    return AfterValidator(validate)


# The keys [balancer] and [pools.NAME] share, validated the same way in both.
StrategyName = Annotated[str, _checked(validate_strategy)]
HashOn = Annotated[str, _checked(validate_hash_on)]
CookieName = Annotated[str, _checked(validate_cookie_name)]


# RFC 3986 reg-name or IP literal, with an optional port: what a Host header may say.
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(:[0-9]{1,5})?")
# How much of a check's answer is read, and so the longest `expect_body` that can match.
CHECK_BODY_LIMIT = 64 * 1024


def parse_status_ranges(value: str) -> tuple[tuple[int, int], ...]:
    """'200,204,300-399' as inclusive (low, high) pairs; ValueError naming the bad part."""
    ranges: list[tuple[int, int]] = []
    for part in value.split(","):
        text = part.strip()
        low, dash, high = text.partition("-")
        try:
            pair = (int(low), int(high) if dash else int(low))
        except ValueError:
            raise ValueError(f"{text!r} is not a status code or a range like 200-399 (in {value!r})") from None
        if not (100 <= pair[0] <= pair[1] <= 599):
            raise ValueError(f"{text!r} is not a status code or a low-high range within 100-599 (in {value!r})")
        ranges.append(pair)
    return tuple(ranges)


def status_allowed(ranges: tuple[tuple[int, int], ...], status: int) -> bool:
    """Whether `status` falls in one of `ranges` (as parse_status_ranges gives them)."""
    return any(low <= status <= high for low, high in ranges)


def validate_health_path(value: str) -> str:
    """A check path: absolute, no whitespace (it goes on the request line as it is)."""
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"must not contain spaces or control characters, got {value!r}")
    return value


PositiveSeconds = Annotated[float, Field(gt=0, le=3600)]
Port = Annotated[int, Field(ge=0, le=65535)]
# A backend's or a pool's name: it shows in logs, metrics labels and URLs of the admin API.
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
# The pool of a backend that names none, and of a request no route matches.
DEFAULT_POOL = "default"
PemFile = Annotated[str, Field(min_length=1)]
TlsVersion = Literal["1.2", "1.3"]
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# An environment variable's name, as a shell would take it.
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ConfigError(Exception):
    """A configuration problem, as one line naming the file and the key."""


class _Section(BaseModel):
    # strict: a quoted "8080" or true-for-an-int is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _FieldError(ValueError):
    """A check across keys of a section, reported under the key named here ("tls_key")."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


class _TlsSection(_Section):
    """A listener's TLS keys: both files, or neither."""

    tls_cert: PemFile | None = None
    tls_key: PemFile | None = None
    tls_min_version: TlsVersion = "1.2"

    @model_validator(mode="after")
    def _cert_and_key(self) -> _TlsSection:
        if self.tls_cert is not None and self.tls_key is None:
            raise _FieldError("tls_key", "missing: tls_cert needs the private key that goes with it")
        if self.tls_key is not None and self.tls_cert is None:
            raise _FieldError("tls_cert", "missing: tls_key needs the certificate that goes with it")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class BalancerConfig(_TlsSection):
    host: str = "127.0.0.1"
    port: Port = 8080
    strategy: StrategyName = "round_robin"
    hash_on: HashOn = "client_ip"
    drain_timeout: PositiveSeconds = 30.0
    shutdown_grace: PositiveSeconds = 10.0
    # Several processes listening on one host and port, the kernel spreading connections (SO_REUSEPORT).
    reuse_port: bool = False
    # A port of each process's own beside the shared one, where Prometheus scrapes exactly that
    # instance: a scrape of the shared port reaches any of them. Process i of --processes N takes
    # instance_port + i.
    instance_port: Port | None = None
    # The cookie that keeps a client on one backend; None: no sticky sessions.
    sticky_cookie: CookieName | None = None

    @field_validator("reuse_port")
    @classmethod
    def _platform_has_reuse_port(cls, value: bool) -> bool:
        if value and not reuse_port_available():
            raise ValueError(f"SO_REUSEPORT is not available on this platform ({sys.platform}); set reuse_port = false")
        return value

    # A plain-HTTP listener (on `host`) answering every request with a 308 to the HTTPS port.
    redirect_http_port: Port | None = None

    @field_validator("instance_port")
    @classmethod
    def _not_the_shared_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and value == info.data.get("port"):
            raise ValueError("must differ from [balancer] port: it is this process's own")
        return value


class ControlConfig(_TlsSection):
    """The control listener: the balancer's own endpoints on a port of their own, when `port` is set."""

    host: str = "127.0.0.1"
    port: Port | None = None
    read_token_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None


class HealthConfig(_Section):
    path: str = "/health"
    # Codes and ranges a check's answer may have: "200,204,300-399".
    expect_status: str = "200-399"
    # A substring the check's body must contain (within its first CHECK_BODY_LIMIT bytes); None: any body.
    expect_body: Annotated[str, Field(min_length=1, max_length=CHECK_BODY_LIMIT)] | None = None
    # The Host header a check sends; None: the backend's own host:port.
    host: str | None = None
    # Seconds over which a backend back in service ramps from 10% to 100% of its weight; 0: at once.
    slow_start: Annotated[float, Field(ge=0, le=3600)] = 0.0
    # Below 0.1 s the checker would keep a core busy; a check waiting over a minute finds nothing.
    interval: Annotated[float, Field(ge=0.1, le=3600)] = 2.0
    timeout: Annotated[float, Field(gt=0, le=60)] = 1.0
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3
    passive_fall: Annotated[int, Field(ge=0, le=1000)] = 3
    # A 5xx is an answer: the backend is alive, and a client can provoke one (as in nginx and HAProxy).
    passive_5xx: bool = False
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50
    ejection_time: PositiveSeconds = 10.0
    max_ejection_time: PositiveSeconds = 300.0

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        return validate_health_path(value)

    @field_validator("expect_status")
    @classmethod
    def _status_ranges(cls, value: str) -> str:
        parse_status_ranges(value)
        return value

    @field_validator("host")
    @classmethod
    def _host_header(cls, value: str | None) -> str | None:
        if value is not None and not _HOST_HEADER.fullmatch(value):
            raise ValueError(f"must be a host name or address with an optional port, got {value!r}")
        return value

    @property
    def status_ranges(self) -> tuple[tuple[int, int], ...]:
        """`expect_status`, parsed (validated already, so this cannot fail)."""
        return _status_ranges_cached(self.expect_status)

    @field_validator("max_ejection_time")
    @classmethod
    def _not_below_ejection_time(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("ejection_time")
        if base is not None and value < base:
            raise ValueError(f"must be at least ejection_time ({base})")
        return value


@functools.lru_cache(maxsize=64)
def _status_ranges_cached(value: str) -> tuple[tuple[int, int], ...]:
    return parse_status_ranges(value)


DEFAULT_DATABASE_PATH = "tasks.db"
POSTGRES_EXTRA = "pip install -e '.[postgres]'"


def redact_url(url: str) -> str:
    """A database URL fit for a log line, an error or /status: any password replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


class DatabaseConfig(_Section):
    """SQLite (`path`, the default) or PostgreSQL (`url`), never both."""

    path: str = DEFAULT_DATABASE_PATH
    url: str | None = None
    password_env: Annotated[str, Field(min_length=1)] | None = None
    pool_min: Annotated[int, Field(ge=0, le=1000)] = 1
    pool_max: Annotated[int, Field(ge=1, le=1000)] = 10

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # Never echo the value: it may hold the password.
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ValueError(f"must look like postgresql://user@host:5432/db, got {redact_url(value)!r}")
        if importlib.util.find_spec("asyncpg") is None:
            raise ValueError(f"PostgreSQL needs asyncpg, which is not installed: {POSTGRES_EXTRA}")
        return value

    @field_validator("pool_max")
    @classmethod
    def _not_below_pool_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("pool_min")
        if low is not None and value < low:
            raise ValueError(f"must be at least pool_min ({low})")
        return value

    @model_validator(mode="after")
    def _path_or_url(self) -> DatabaseConfig:
        if self.url is not None and "path" in self.model_fields_set:
            raise ValueError("set 'path' (SQLite) or 'url' (PostgreSQL), not both")
        return self

    @property
    def postgres(self) -> bool:
        return self.url is not None

    @property
    def where(self) -> str:
        """The database as a log line or an error may name it: the SQLite file, or the URL without its password."""
        return redact_url(self.url) if self.url is not None else self.path


class LogConfig(_Section):
    file: str = "balancer.log"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    max_bytes: Annotated[int, Field(ge=0)] = 10 * 1024 * 1024
    backups: Annotated[int, Field(ge=0, le=100)] = 5
    format: Literal["text", "json"] = "text"
    # None: access lines go to `file` with everything else.
    access_file: Annotated[str, Field(min_length=1)] | None = None
    access_max_bytes: Annotated[int, Field(ge=0)] = 10 * 1024 * 1024
    access_backups: Annotated[int, Field(ge=0, le=100)] = 5

    @field_validator("file", "access_file")
    @classmethod
    def _only_pid_placeholder(cls, value: str | None) -> str | None:
        rest = (value or "").replace(PID_PLACEHOLDER, "")
        if "{" in rest or "}" in rest:
            raise ValueError(f"the only placeholder a log file name may hold is {PID_PLACEHOLDER}, got {value!r}")
        return value

    def file_for(self, pid: int) -> str:
        """The log file of process `pid`: `file` with `{pid}` replaced."""
        return self.file.replace(PID_PLACEHOLDER, str(pid))

    def access_file_for(self, pid: int) -> str | None:
        """The access file of process `pid`: `access_file` with `{pid}` replaced; None when unset."""
        return None if self.access_file is None else self.access_file.replace(PID_PLACEHOLDER, str(pid))


class ErrorsConfig(_Section):
    recent: Annotated[int, Field(ge=1, le=100_000)] = 50


class ApiConfig(_Section):
    debug_endpoints: bool = True
    max_body_bytes: Annotated[int, Field(ge=1, le=1 << 30)] = 1_048_576


class ProxyConfig(_Section):
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_on_status: list[Annotated[int, Field(ge=500, le=599)]] = [502, 503, 504]
    retry_budget_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    connect_timeout: PositiveSeconds = 1.0
    per_try_timeout: PositiveSeconds = 10.0
    request_timeout: PositiveSeconds = 30.0
    max_connections_per_backend: Annotated[int, Field(ge=1, le=100_000)] = 100
    max_pending: Annotated[int, Field(ge=0, le=1_000_000)] = 1000
    max_body_bytes: Annotated[int, Field(ge=0)] = 0  # 0: no limit at the balancer
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 8190
    max_header_section_bytes: Annotated[int, Field(ge=1024, le=1 << 24)] = 65536
    max_response_header_bytes: Annotated[int, Field(ge=1024, le=1 << 24)] = 65536
    max_response_headers: Annotated[int, Field(ge=1, le=10_000)] = 100
    header_timeout: PositiveSeconds = 10.0
    body_timeout: PositiveSeconds = 30.0
    idle_timeout: PositiveSeconds = 75.0
    upstream_idle_timeout: PositiveSeconds = 30.0
    max_tunnels_per_backend: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    ca_file: Annotated[str, Field(min_length=1)] | None = None
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or network: {item!r}") from None
        return value


DEFAULT_TOKEN_ENV = "LB_ADMIN_TOKEN"


class AdminConfig(_Section):
    token_env: str = DEFAULT_TOKEN_ENV


class BackendConfig(_Section):
    name: Name
    port: Port | None = None
    host: str | None = None
    url: str | None = None
    weight: Annotated[int, Field(ge=1, le=100)] = 1
    pool: Name = DEFAULT_POOL
    # Gets traffic only while no primary (non-backup) backend serves, as HAProxy's and nginx's `backup`.
    backup: bool = False
    # This backend's check path instead of [health] path.
    health_path: str | None = None

    @field_validator("health_path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        return None if value is None else validate_health_path(value)

    @model_validator(mode="after")
    def _port_or_url(self) -> BackendConfig:
        if (self.port is None) == (self.url is None):
            raise ValueError("needs exactly one of 'port' (hosted here) or 'url' (an outside server)")
        if self.url is not None:
            if self.host is not None:
                raise ValueError("'host' goes with 'port', not with 'url'")
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"url must look like http://host:port, got {self.url!r}")
        return self

    @property
    def hosted(self) -> bool:
        return self.port is not None


class PoolConfig(_Section):
    """A pool's settings, resolved: every key the pool's own `[pools.NAME]` does not set comes from
    `[balancer]` (strategy, hash_on, sticky_cookie) or `[health]` (the checks, slow_start)."""

    strategy: StrategyName = "round_robin"
    hash_on: HashOn = "client_ip"
    sticky_cookie: CookieName | None = None
    slow_start: Annotated[float, Field(ge=0, le=3600)] = 0.0
    health: HealthConfig = HealthConfig()


# The [pools.NAME] keys that fall back to [balancer]'s; slow_start and [pools.NAME.health] fall back to [health].
POOL_BALANCER_KEYS = ("strategy", "hash_on", "sticky_cookie")
_HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")


def _route_host(value: str) -> str:
    """A route's host, lower-cased: a name or address, or `*.` and a name (any subdomain of it)."""
    host = value.strip().lower().rstrip(".")
    name = host.removeprefix("*.")
    if not name or name == "*":
        raise ValueError(f"must be a host name or '*.example.com', got {value!r}; leave host out to match every host")
    if name.startswith("[") and name.endswith("]"):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address: {value!r}") from None
        if host != name:
            raise ValueError(f"a wildcard needs a domain name, got {value!r}")
        return host
    if ":" in name:
        raise ValueError(f"a route's host has no port (a request matches whatever its port), got {value!r}")
    if not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"must be a host name or '*.example.com', got {value!r}")
    return host


def _route_prefix(value: str) -> str:
    """A route's path prefix, without a trailing slash (but "/"): it is matched on whole segments."""
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    if any(c in value for c in "?#%\\") or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"must be a plain decoded path (no query, '#', '%', '\\' or spaces), got {value!r}")
    prefix = value.rstrip("/") or "/"
    if any(segment in ("", ".", "..") for segment in prefix.split("/")[1:]) and prefix != "/":
        raise ValueError(f"must not hold empty, '.' or '..' segments, got {value!r}")
    return prefix


class RouteConfig(_Section):
    """One [[routes]] entry: requests for `host` (any when unset) under `path_prefix` go to `pool`."""

    host: str | None = None
    path_prefix: str = "/"
    strip_prefix: bool = False
    pool: Name

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str | None) -> str | None:
        return None if value is None else _route_host(value)

    @field_validator("path_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        return _route_prefix(value)

    def describe(self) -> str:
        """How logs and records name the route: `api.example.com/api`, `*.example.com/`, `/static`."""
        return f"{self.host or ''}{self.path_prefix}"


def _resolve_pools(data: dict[str, Any]) -> dict[str, Any]:
    """The raw document with every pool in use ([pools.NAME] tables, the pools backends name, and
    "default") given the global keys it does not set itself; validated afterwards as PoolConfigs."""
    raw_pools = data.get("pools", {})
    if not isinstance(raw_pools, dict):
        return data  # validation says what is wrong with it
    balancer, health = data.get("balancer", {}), data.get("health", {})
    balancer = balancer if isinstance(balancer, dict) else {}
    health = health if isinstance(health, dict) else {}
    names = {DEFAULT_POOL: None} | dict.fromkeys(raw_pools)
    backends = data.get("backends", [])
    for backend in backends if isinstance(backends, list) else []:
        if isinstance(backend, dict) and isinstance(backend.get("pool"), str):
            names.setdefault(backend["pool"], None)
    pools: dict[str, Any] = {}
    for name in names:
        own = raw_pools.get(name, {})
        if not isinstance(own, dict):
            pools[name] = own
            continue
        resolved = {key: balancer[key] for key in POOL_BALANCER_KEYS if key in balancer and key in PoolConfig.model_fields}
        resolved |= own
        own_health = own.get("health", {})
        if isinstance(own_health, dict):
            pool_health = health | own_health
            if "slow_start" not in own and "slow_start" in pool_health:
                resolved["slow_start"] = pool_health["slow_start"]
            if "slow_start" in HealthConfig.model_fields and "slow_start" in resolved:
                pool_health["slow_start"] = resolved["slow_start"]  # one value, however it was written
            resolved["health"] = pool_health
        pools[name] = resolved
    return data | {"pools": pools}


def _default_backends() -> list[BackendConfig]:
    return [BackendConfig(name="backend-1", port=5001), BackendConfig(name="backend-2", port=5002)]


class Config(_Section):
    """The whole configuration; paths are absolute once loaded from a file."""

    balancer: BalancerConfig = BalancerConfig()
    control: ControlConfig = ControlConfig()
    health: HealthConfig = HealthConfig()
    database: DatabaseConfig = DatabaseConfig()
    log: LogConfig = LogConfig()
    errors: ErrorsConfig = ErrorsConfig()
    api: ApiConfig = ApiConfig()
    proxy: ProxyConfig = ProxyConfig()
    admin: AdminConfig = AdminConfig()
    backends: list[BackendConfig] = Field(default_factory=_default_backends)
    # Every pool in use, resolved (see _resolve_pools); "default" is always there.
    pools: dict[Name, PoolConfig] = {}
    routes: list[RouteConfig] = []
    # The [pools.NAME] tables as written (before the global keys filled them in): what a reload compares.
    _written_pools: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _pools_in_use(cls, data: Any, handler: ModelWrapValidatorHandler[Config]) -> Config:
        if not isinstance(data, dict):
            return handler(data)
        if "backends" not in data:
            data = data | {"backends": [b.model_dump(exclude_defaults=True) for b in _default_backends()]}
        config = handler(_resolve_pools(data))
        config._written_pools = {name: dict(table) for name, table in data.get("pools", {}).items()}
        return config

    def written_pool(self, name: str) -> dict[str, Any]:
        """The keys `[pools.NAME]` sets itself (its `health` table as written too); {} when it has none."""
        return self._written_pools.get(name, {})

    @model_validator(mode="after")
    def _routes_to_pools(self) -> Config:
        staffed = {b.pool for b in self.backends}
        seen: dict[tuple[str | None, str], int] = {}
        for index, route in enumerate(self.routes):
            if route.pool not in staffed:
                raise _ItemError("routes", index, "pool", f"pool {route.pool!r} has no backends")
            key = (route.host, route.path_prefix)
            if key in seen:
                raise _ItemError("routes", index, "", f"duplicate of route #{seen[key] + 1} ({route.describe()})")
            seen[key] = index
        return self

    @property
    def routed(self) -> bool:
        """Whether requests are sorted into pools at all: routes, or a backend outside "default"
        (as `Pools.routed` says of the running system)."""
        return bool(self.routes) or any(b.pool != DEFAULT_POOL for b in self.backends)

    @model_validator(mode="after")
    def _listeners(self) -> Config:
        balancer, control = self.balancer, self.control
        if balancer.redirect_http_port is not None and not balancer.tls:
            raise _SectionError("balancer", "redirect_http_port", "needs tls_cert and tls_key: it redirects to HTTPS")
        if control.port is None:
            for key in ("tls_cert", "tls_key", "read_token_env"):
                if getattr(control, key) is not None:
                    raise _SectionError("control", key, "needs [control] port: without it there is no control listener")
        taken: dict[int, str] = {}
        for key, port in self._listener_ports():
            if port:  # 0 means "any free port", never a clash
                section, name = key.split(" ", 1)
                if port in taken:
                    raise _SectionError(section, name, f"port {port} is already used by {taken[port]}")
                taken[port] = f"[{section}] {name}"
        return self

    def _listener_ports(self) -> list[tuple[str, int | None]]:
        return [
            ("balancer port", self.balancer.port),
            ("control port", self.control.port),
            ("balancer redirect_http_port", self.balancer.redirect_http_port),
        ]

    @model_validator(mode="after")
    def _unique_backends(self) -> Config:
        names: dict[str, int] = {}
        listeners = {port: f"[{key.replace(' ', '] ', 1)}" for key, port in self._listener_ports() if port}
        ports: dict[int, int] = dict.fromkeys(listeners, -1)
        urls: dict[tuple[str, str, int, str], int] = {}
        instance_port = self.balancer.instance_port
        for index, backend in enumerate(self.backends):
            if backend.name in names:
                raise _ItemError("backends", index, "name", f"duplicate backend name {backend.name!r}")
            names[backend.name] = index
            if backend.port:  # 0 means "any free port", never a clash
                if backend.port == instance_port:
                    clash = f"port {backend.port} is already used by [balancer] instance_port"
                    raise _ItemError("backends", index, "port", clash)
                if backend.port in ports:
                    other = listeners[backend.port] if ports[backend.port] < 0 else repr(self.backends[ports[backend.port]].name)
                    raise _ItemError("backends", index, "port", f"port {backend.port} is already used by {other}")
                ports[backend.port] = index
            address = self._address_of(backend)
            if address is None:
                continue
            if backend.url is not None:
                loop = self._own_listener(address)
                if loop is not None:
                    raise _ItemError("backends", index, "url", f"{backend.url} is the balancer's own {loop}: requests would loop")
            if address in urls:
                other = self.backends[urls[address]].name
                raise _ItemError("backends", index, "url" if backend.url else "port", f"the same server as backend {other!r}")
            urls[address] = index
        return self

    def _address_of(self, backend: BackendConfig) -> tuple[str, str, int, str] | None:
        """(scheme, host, port, path) a backend is reached at; None for a hosted one on a free port."""
        if backend.url is None:
            if not backend.port:
                return None
            return "http", _local_alias(backend.host or self.balancer.host), backend.port, ""
        parts = urlsplit(backend.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return parts.scheme, _local_alias(parts.hostname or ""), port, parts.path.rstrip("/")

    def _own_listener(self, address: tuple[str, str, int, str]) -> str | None:
        """The balancer's listener (as "[balancer] port") a backend address names, or None."""
        _, host, port, _ = address
        for key, listener_port in self._listener_ports():
            section = key.split(" ", 1)[0]
            bound = self.control.host if section == "control" else self.balancer.host
            if listener_port and port == listener_port and host in (_local_alias(bound), _local_alias("0.0.0.0")):
                return f"[{key.replace(' ', '] ', 1)}"
        return None

    def summary(self) -> str:
        hosted = sum(1 for b in self.backends if b.hosted)
        balancer, control = self.balancer, self.control
        listeners = f"balancer on {balancer.host}:{balancer.port}" + (" (TLS)" if balancer.tls else "")
        if balancer.redirect_http_port is not None:
            listeners += f", redirect from {balancer.host}:{balancer.redirect_http_port}"
        if control.port is not None:
            listeners += f", control on {control.host}:{control.port}" + (" (TLS)" if control.tls else "")
        return (
            f"{listeners} ({balancer.strategy}), "
            f"{len(self.backends)} backends ({hosted} hosted, {len(self.backends) - hosted} outside), "
            + (f"{len({b.pool for b in self.backends})} pools, {len(self.routes)} routes, " if self.routed else "")
            + (f"database {self.database.where}, " if hosted else "no database (nothing hosted), ")
            + f"log {self.log.file}"
        )


# Names a local client may use for a server bound on a loopback or on every address.
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""})


def _local_alias(host: str) -> str:
    """One spelling for the loopback names, so two spellings of one local server compare equal."""
    host = host.lower().strip("[]")
    return "127.0.0.1" if host in _LOOPBACK else host


class _ItemError(ValueError):
    """A mistake found across entries of an array of tables ([[backends]], [[routes]])."""

    def __init__(self, table: str, index: int, key: str, message: str) -> None:
        super().__init__(message)
        self.table, self.index, self.key, self.message = table, index, key, message


def _item_label(table: str, index: int, data: dict) -> str:
    """`[[backends]] #2 (backend-2)`: an entry as a user finds it in the file."""
    raw = data.get(table)
    name = ""
    if isinstance(raw, list) and index < len(raw) and isinstance(raw[index], dict):
        if isinstance(raw[index].get("name"), str):
            name = f" ({raw[index]['name']})"
    return f"[[{table}]] #{index + 1}{name}"


class _SectionError(ValueError):
    """A check across sections, reported under `[section] key`."""

    def __init__(self, section: str, key: str, message: str) -> None:
        super().__init__(message)
        self.section, self.key, self.message = section, key, message


def server_tls_context(cert: str, key: str, min_version: str = "1.2") -> ssl.SSLContext:
    """A server-side SSLContext for a listener: its certificate chain and key, `min_version` at
    least, ALPN offering http/1.1. Raises _FieldError naming the file at fault."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if not Path(path).is_file():
            raise _FieldError(name, f"no such file: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS[min_version]
    context.set_alpn_protocols(["http/1.1"])
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError, ValueError) as error:
        raise _FieldError("tls_cert", f"not a PEM certificate: {cert} ({_ssl_reason(error)})") from None
    try:
        # A password-protected key gets an empty password instead of a prompt on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError, ValueError) as error:
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            raise _FieldError("tls_key", f"does not match the certificate in tls_cert: {key}") from None
        raise _FieldError("tls_key", f"not a PEM private key without a password: {key} ({_ssl_reason(error)})") from None
    return context


def _ssl_reason(error: BaseException) -> str:
    return getattr(error, "reason", None) or str(error) or type(error).__name__


def tls_context_of(section: BalancerConfig | ControlConfig, name: str, source: str) -> ssl.SSLContext | None:
    """The SSLContext a listener's section asks for, or None without TLS; ConfigError names the key."""
    if section.tls_cert is None or section.tls_key is None:
        return None
    try:
        return server_tls_context(section.tls_cert, section.tls_key, section.tls_min_version)
    except _FieldError as error:
        raise ConfigError(f"{source}: [{name}] {error.key}: {error.message}") from None


def missing_read_token(config: Config) -> str | None:
    """Why the control listener's read token cannot be had (its variable is unset), or None."""
    name = config.control.read_token_env
    if name is None or os.environ.get(name, ""):
        return None
    return f"[control] read_token_env: the environment variable {name} is not set (it holds the control endpoints' token)"


def _key_name(loc: tuple[int | str, ...], data: dict) -> str:
    """Turn pydantic's error location into the TOML key a user would look for."""
    if not loc:
        return "(top level)"
    if loc[0] in ("backends", "routes") and len(loc) >= 2 and isinstance(loc[1], int):
        rest = ".".join(str(p) for p in loc[2:] if not str(p).startswith("function-"))
        return _item_label(str(loc[0]), loc[1], data) + (f" {rest}" if rest else "")
    if loc[0] == "pools" and len(loc) >= 2:
        pool, keys = str(loc[1]), [str(p) for p in loc[2:]]
        if keys == ["[key]"]:
            return f"[pools] {pool!r}"
        if keys[:1] == ["health"] and len(keys) > 1:
            return f"[pools.{pool}.health] " + ".".join(keys[1:])
        return f"[pools.{pool}]" + (f" {'.'.join(keys)}" if keys else "")
    if len(loc) == 1:
        return f"[{loc[0]}]"
    return f"[{loc[0]}] " + ".".join(str(p) for p in loc[1:])


def _first_error_line(error: ValidationError, data: dict) -> str:
    first = error.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        what = "section" if len(loc) == 1 else "key"
        return f"{_key_name(loc, data)}: unknown {what}"
    if "input" in first and first["type"] not in ("missing", "model_attributes_type", "value_error"):
        shown = first["input"]
        if not isinstance(shown, (dict, list)):
            message += f" (got {shown!r})"
    return f"{_key_name(loc, data)}: {message}"


def parse_config(data: dict, *, source: str = DEFAULT_CONFIG_PATH, base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError with one line naming the key."""
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        cause = error.errors(include_url=False)[0].get("ctx", {}).get("error")
        if isinstance(cause, _ItemError):
            label = _item_label(cause.table, cause.index, data) + (f" {cause.key}" if cause.key else "")
            raise ConfigError(f"{source}: {label}: {cause.message}") from None
        first = error.errors(include_url=False)[0]
        if isinstance(cause, _SectionError):
            raise ConfigError(f"{source}: [{cause.section}] {cause.key}: {cause.message}") from None
        if isinstance(cause, _FieldError) and first["loc"]:
            raise ConfigError(f"{source}: [{first['loc'][0]}] {cause.key}: {cause.message}") from None
        raise ConfigError(f"{source}: {_first_error_line(error, data)}") from None
    if base_dir is not None:
        update: dict[str, BaseModel] = {
            "log": config.log.model_copy(
                update={
                    "file": str(base_dir / config.log.file),
                    "access_file": None if config.log.access_file is None else str(base_dir / config.log.access_file),
                }
            ),
        }
        if not config.database.postgres:
            update["database"] = config.database.model_copy(update={"path": str(base_dir / config.database.path)})
        if config.proxy.ca_file is not None:
            update["proxy"] = config.proxy.model_copy(update={"ca_file": str(base_dir / config.proxy.ca_file)})
        for name in ("balancer", "control"):
            section = getattr(config, name)
            if section.tls_cert is not None and section.tls_key is not None:
                files = {"tls_cert": str(base_dir / section.tls_cert), "tls_key": str(base_dir / section.tls_key)}
                update[name] = section.model_copy(update=files)
        config = config.model_copy(update=update)
    if (
        config.log.access_file is not None
        and Path(config.log.access_file_for(0) or "").resolve() == Path(config.log.file_for(0)).resolve()
    ):
        raise ConfigError(f"{source}: [log] access_file: must not be [log] file ({config.log.file}): it has a writer of its own")
    if config.proxy.ca_file is not None and not Path(config.proxy.ca_file).is_file():
        raise ConfigError(f"{source}: [proxy] ca_file: no such file: {config.proxy.ca_file}")
    for name in ("balancer", "control"):
        tls_context_of(getattr(config, name), name, source)  # the files load, and the key matches
    return config


# What one `python run.py` process serves: everything (the default), only the hosted task-API
# backends (machines behind a balancer elsewhere), or only the balancer (in front of `url` backends).
ROLES: tuple[str, ...] = ("all", "backends", "balancer")


def check_role(config: Config, role: str, *, source: str = DEFAULT_CONFIG_PATH) -> None:
    """Raise ConfigError, one line naming the backend, when `config` cannot run in `role`."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if role == "backends" and not any(backend.hosted for backend in config.backends):
        raise ConfigError(f"{source}: [[backends]]: --role backends needs a hosted backend (one with a port) to serve")
    if role != "balancer":
        return
    for index, backend in enumerate(config.backends):
        if backend.hosted:
            raise ConfigError(
                f"{source}: [[backends]] #{index + 1} ({backend.name}) port: a hosted backend cannot run with --role balancer "
                "(give it a url, and serve it with --role backends)"
            )


def check_processes(config: Config, processes: int, *, source: str = DEFAULT_CONFIG_PATH) -> None:
    """Raise ConfigError, one line naming the key, when `config` cannot run as `processes`
    balancer processes on one port (`--processes`)."""
    if not reuse_port_available():
        raise ConfigError(f"--processes is not available on this platform ({sys.platform}): it needs SO_REUSEPORT, POSIX signals")
    if processes < 2:
        return
    needs = f"--processes {processes} needs"
    if not config.balancer.reuse_port:
        raise ConfigError(f"{source}: [balancer] reuse_port: {needs} reuse_port = true: the processes share one port")
    if config.balancer.port == 0:
        raise ConfigError(f"{source}: [balancer] port: {needs} a fixed port, not 0: the processes share one port")
    for key, name in (("file", config.log.file), ("access_file", config.log.access_file)):
        if name is not None and PID_PLACEHOLDER not in name:
            raise ConfigError(
                f"{source}: [log] {key}: {needs} {PID_PLACEHOLDER} in the name, so that each process writes its own"
            )


def load_config(path: str | Path = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate a config file; relative paths in it are resolved against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: TOML syntax error: {error}") from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)
