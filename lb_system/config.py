"""Configuration: config.toml read, validated and resolved into frozen objects."""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

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


PositiveSeconds = Annotated[float, Field(gt=0, le=3600)]
Port = Annotated[int, Field(ge=0, le=65535)]


class ConfigError(Exception):
    """A configuration problem, as one line naming the file and the key."""


class _Section(BaseModel):
    # strict: a quoted "8080" or true-for-an-int is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BalancerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    strategy: str = "round_robin"
    hash_on: str = "client_ip"
    drain_timeout: PositiveSeconds = 30.0
    shutdown_grace: PositiveSeconds = 10.0
    # Several processes listening on one host and port, the kernel spreading connections (SO_REUSEPORT).
    reuse_port: bool = False

    @field_validator("reuse_port")
    @classmethod
    def _platform_has_reuse_port(cls, value: bool) -> bool:
        if value and not reuse_port_available():
            raise ValueError(f"SO_REUSEPORT is not available on this platform ({sys.platform}); set reuse_port = false")
        return value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGY_NAMES:
            raise ValueError(f"must be one of {', '.join(STRATEGY_NAMES)}, got {value!r}")
        return value

    @field_validator("hash_on")
    @classmethod
    def _known_hash_on(cls, value: str) -> str:
        validate_hash_on(value)
        return value


class HealthConfig(_Section):
    path: str = "/health"
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
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value

    @field_validator("max_ejection_time")
    @classmethod
    def _not_below_ejection_time(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("ejection_time")
        if base is not None and value < base:
            raise ValueError(f"must be at least ejection_time ({base})")
        return value


class DatabaseConfig(_Section):
    path: str = "tasks.db"


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
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    port: Port | None = None
    host: str | None = None
    url: str | None = None
    weight: Annotated[int, Field(ge=1, le=100)] = 1

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


def _default_backends() -> list[BackendConfig]:
    return [BackendConfig(name="backend-1", port=5001), BackendConfig(name="backend-2", port=5002)]


class Config(_Section):
    """The whole configuration; paths are absolute once loaded from a file."""

    balancer: BalancerConfig = BalancerConfig()
    health: HealthConfig = HealthConfig()
    database: DatabaseConfig = DatabaseConfig()
    log: LogConfig = LogConfig()
    errors: ErrorsConfig = ErrorsConfig()
    api: ApiConfig = ApiConfig()
    proxy: ProxyConfig = ProxyConfig()
    admin: AdminConfig = AdminConfig()
    backends: list[BackendConfig] = Field(default_factory=_default_backends)

    @model_validator(mode="after")
    def _unique_backends(self) -> Config:
        names: dict[str, int] = {}
        ports: dict[int, int] = {self.balancer.port: -1} if self.balancer.port else {}
        for index, backend in enumerate(self.backends):
            if backend.name in names:
                raise _BackendError(index, "name", f"duplicate backend name {backend.name!r}")
            names[backend.name] = index
            if backend.port:  # 0 means "any free port", never a clash
                if backend.port in ports:
                    other = "[balancer] port" if ports[backend.port] < 0 else repr(self.backends[ports[backend.port]].name)
                    raise _BackendError(index, "port", f"port {backend.port} is already used by {other}")
                ports[backend.port] = index
        return self

    def summary(self) -> str:
        hosted = sum(1 for b in self.backends if b.hosted)
        return (
            f"balancer on {self.balancer.host}:{self.balancer.port} ({self.balancer.strategy}), "
            f"{len(self.backends)} backends ({hosted} hosted, {len(self.backends) - hosted} outside), "
            f"database {self.database.path}, log {self.log.file}"
        )


class _BackendError(ValueError):
    def __init__(self, index: int, key: str, message: str) -> None:
        super().__init__(message)
        self.index, self.key, self.message = index, key, message


def _key_name(loc: tuple[int | str, ...], data: dict) -> str:
    """Turn pydantic's error location into the TOML key a user would look for."""
    if not loc:
        return "(top level)"
    if loc[0] == "backends" and len(loc) >= 2 and isinstance(loc[1], int):
        index = loc[1]
        name = ""
        raw = data.get("backends")
        if isinstance(raw, list) and index < len(raw) and isinstance(raw[index], dict):
            if isinstance(raw[index].get("name"), str):
                name = f" ({raw[index]['name']})"
        rest = ".".join(str(p) for p in loc[2:] if not str(p).startswith("function-"))
        return f"[[backends]] #{index + 1}{name}" + (f" {rest}" if rest else "")
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
        if isinstance(cause, _BackendError):
            raw = data.get("backends", [])
            name = raw[cause.index].get("name") if isinstance(raw[cause.index], dict) else None
            label = f"[[backends]] #{cause.index + 1}" + (f" ({name})" if name else "")
            raise ConfigError(f"{source}: {label} {cause.key}: {cause.message}") from None
        raise ConfigError(f"{source}: {_first_error_line(error, data)}") from None
    if base_dir is not None:
        update = {
            "database": config.database.model_copy(update={"path": str(base_dir / config.database.path)}),
            "log": config.log.model_copy(
                update={
                    "file": str(base_dir / config.log.file),
                    "access_file": None if config.log.access_file is None else str(base_dir / config.log.access_file),
                }
            ),
        }
        if config.proxy.ca_file is not None:
            update["proxy"] = config.proxy.model_copy(update={"ca_file": str(base_dir / config.proxy.ca_file)})
        config = config.model_copy(update=update)
    if (
        config.log.access_file is not None
        and Path(config.log.access_file_for(0) or "").resolve() == Path(config.log.file_for(0)).resolve()
    ):
        raise ConfigError(f"{source}: [log] access_file: must not be [log] file ({config.log.file}): it has a writer of its own")
    if config.proxy.ca_file is not None and not Path(config.proxy.ca_file).is_file():
        raise ConfigError(f"{source}: [proxy] ca_file: no such file: {config.proxy.ca_file}")
    return config


# What one `python run.py` process serves: everything (the default), only the hosted task-API
# backends (machines behind a balancer elsewhere), or only the balancer (in front of `url` backends).
ROLES: tuple[str, ...] = ("all", "backends", "balancer")


def check_role(config: Config, role: str, *, source: str = DEFAULT_CONFIG_PATH) -> None:
    """Raise ConfigError, one line naming the backend, when `config` cannot run in `role`."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if role != "balancer":
        return
    for index, backend in enumerate(config.backends):
        if backend.hosted:
            raise ConfigError(
                f"{source}: [[backends]] #{index + 1} ({backend.name}) port: a hosted backend cannot run with --role balancer "
                "(give it a url, and serve it with --role backends)"
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
