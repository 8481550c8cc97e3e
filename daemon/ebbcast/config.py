"""Configuration: schema, loading, layering and validation.

The configuration is a TOML file (every key in config/ebbcast.toml) with a fixed
set of sections and keys. Values are layered, highest first: command-line flag,
environment variable ``EBBCAST_<SECTION>_<KEY>``, config file, built-in default.
Every value is validated at load time and every problem is reported at once, each
naming its key, so that ``ebbcast check-config`` can list them all and a typo never
passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union
from urllib.parse import urlsplit

from ebbcast.values import (
    is_service_link,
    parse_network,
    parse_sentinel_url,
    parse_verification_keys,
    read_secret_file,
    read_text_file,
)


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)

ENV_PREFIX = "EBBCAST_"

#: Keys whose new value a SIGHUP applies to the running daemon (docs/configuration.md).
#: A whole section is named by its name followed by ``.*``.
RELOADABLE = (
    "broadcast.*",
    "limits.*",
    "channels.*",
    "keepalive.*",
    "logging.level",
    "admin.token",
    "admin.token_file",
    "auth.*",
    "shutdown.progress_interval",
)

#: Keys whose values are never printed or logged.
SECRETS = ("admin.token", "auth.jwt_key")

#: WebSocket close codes a server may send (RFC 6455 section 7.4).
SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  1012, 1013, 1014} | set(range(3000, 5000)))

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_LEVELS = ("debug", "info", "warning", "error")

Value = Union[str, int, float, bool, list[str]]
Check = Callable[[Any], Union[str, None]]


class ConfigError(Exception):
    """One or more problems with a configuration; each names its key."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{key}: {reason}" for key, reason in problems))


# -- value kinds ------------------------------------------------------------------

def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as ``"250ms"``, ``"30m"``.

    Raises ValueError with a reason for anything else, negatives included.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10, \"250ms\", \"10s\", \"30m\" or \"1h\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use a number of seconds or "
                             "a number with ms, s, m or h, e.g. \"10s\"")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("expected a duration such as 10, \"250ms\", \"10s\", \"30m\" or \"1h\"")
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact unit string for a duration, e.g. 1800.0 -> ``"30m"``."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    millis = seconds * 1000
    if millis.is_integer():
        return f"{int(millis)}ms"
    return f"{millis:.6f}".rstrip("0").rstrip(".") + "ms"


def _parse_bool_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_list_text(text: str) -> list[str]:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"invalid JSON list: {exc}") from None
        if not isinstance(parsed, list):
            raise ValueError("expected a JSON list of strings")
        return parsed
    return [item.strip() for item in stripped.split(",") if item.strip()]


def _coerce(kind: str, value: object, from_text: bool) -> Value:
    """Convert a file value (or, with from_text, an env/CLI string) to ``kind``."""
    if from_text and isinstance(value, str):
        text = value
        if kind == "int":
            try:
                return int(text.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
        if kind == "float":
            try:
                value = float(text.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {text!r}") from None
        elif kind == "bool":
            return _parse_bool_text(text)
        elif kind == "list":
            value = _parse_list_text(text)
    if kind == "duration":
        return parse_duration(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "list" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    expected = {"str": "a string", "int": "an integer", "float": "a number",
                "bool": "true or false", "list": "a list of strings"}[kind]
    raise ValueError(f"expected {expected}, got {type(value).__name__} {value!r}")


# -- checks -----------------------------------------------------------------------

def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}, got {v!r}"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"


def _check_port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be a port number 0-65535, got {v}"


def _check_ws_path(v: str) -> str | None:
    if not re.fullmatch(r"/[A-Za-z0-9_.~-]+(/[A-Za-z0-9_.~-]+)*", v):
        return f"must be a path like \"/ws\" (not \"/\", no trailing slash), got {v!r}"
    return None


def _check_origins(v: list[str]) -> str | None:
    for origin in v:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            return f"each origin must be \"*\" or like \"https://example.com\", got {origin!r}"
    return None


def _check_networks(v: list[str]) -> str | None:
    for text in v:
        try:
            parse_network(text)
        except ValueError:
            return f"each entry must be an address or CIDR like \"10.0.0.0/8\", got {text!r}"
    return None


def _check_close_code(v: int) -> str | None:
    if v not in SENDABLE_CLOSE_CODES:
        return f"must be a close code a server may send (1000-1003, 1007-1014, 3000-4999), got {v}"
    return None


def _check_backplane(v: str) -> str | None:
    if v == "memory://":
        return None
    parts = urlsplit(v)
    if parts.scheme == "redis+sentinel":
        try:
            parse_sentinel_url(v)
        except ValueError as exc:
            return ("a Sentinel URL is redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB]: "
                    f"{exc}")
        return None
    try:
        if parts.scheme in ("redis", "rediss") and parts.hostname:
            return None
    except ValueError:
        pass
    return (f"must be \"memory://\", \"redis://host:port/db\" or "
            f"\"redis+sentinel://host:port[,host:port...]/master\", got {_masked(v)!r}")


def _check_public_url(v: str) -> str | None:
    if not v:
        return None
    parts = urlsplit(v)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("ws", "wss") or not parts.hostname or not port_ok \
            or parts.query or parts.fragment or not parts.path.startswith("/"):
        return f"must be a ws:// or wss:// URL with a path, like \"wss://chat.example.com/ws\"; got {v!r}"
    if parts.hostname in ("0.0.0.0", "::"):
        return f"names an unspecified address, which no client can reach: {v!r}"
    return None


def _check_prefix(v: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
        return None
    return f"must be 1-64 letters, digits, \"_\", \".\" or \"-\" (no \":\"), got {v!r}"


def _masked(url: str) -> str:
    """A URL with its password, if any, replaced (error messages are printed)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user + ':***' if colon else '***'}@{hosts}"


def _check_token(value: str) -> str | None:
    """A bearer token travels in an HTTP header: printable ASCII, no spaces."""
    if all("!" <= c <= "~" for c in value):
        return None
    return "must be printable ASCII without spaces (it is sent in an HTTP header)"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _key(kind: str, default: Value, doc: str, check: Check | None = None) -> Any:
    meta = {"kind": kind, "doc": doc, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# -- schema -----------------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    host: str = _key("str", "127.0.0.1", "address of the public listener (page and WebSocket)")
    port: int = _key("int", 8000, "port of the public listener; 0 = any free port", _check_port)
    ws_path: str = _key("str", "/ws", "WebSocket path; /ws/{client_id} is accepted too",
                        _check_ws_path)
    workers: int = _key("int", 1, "worker processes; 0 = one per CPU", _at_least(0))
    worker_timeout: float = _key("duration", 30.0, "a worker that sends no heartbeat this long "
                                 "is stuck: killed and restarted",
                                 _positive)
    max_connections: int = _key("int", 0, "WebSocket connections per process; 0 = unlimited "
                                "(over it: HTTP 503)", _at_least(0))
    max_message_bytes: int = _key("int", 65536, "largest inbound frame; larger: close 1009",
                                  _at_least(1))
    allowed_origins: list[str] = _key("list", [], "[] = same origin only; list of origins; "
                                      "[\"*\"] = any", _check_origins)
    tls_cert: str = _key("str", "", "PEM certificate path; with tls_key: wss and https")
    tls_key: str = _key("str", "", "PEM private key path")
    trusted_proxies: list[str] = _key("list", [], "addresses or CIDRs of reverse proxies whose "
                                      "X-Forwarded-For / X-Real-IP name the client",
                                      _check_networks)
    header_timeout: float = _key("duration", 60.0, "a request's headers (and the next request "
                                 "on a kept-alive connection) must arrive within this; "
                                 "else the connection is closed", _positive)
    body_timeout: float = _key("duration", 30.0, "a request body that stops arriving is "
                               "given up after this; the connection is closed", _positive)
    public_url: str = _key("str", "", "URL clients reach this instance at, e.g. "
                           "\"wss://chat.example.com/ws\" (behind a proxy), advertised to "
                           "draining clients; \"\" = the bound address", _check_public_url)


@dataclass(frozen=True)
class AdminConfig:
    host: str = _key("str", "127.0.0.1", "address of the admin listener "
                     "(metrics, health, status, publish)")
    port: int = _key("int", 8001, "port of the admin listener; 0 = any free port", _check_port)
    token: str = _key("str", "", "bearer token for POST /broadcast, /drain and /upgrade; "
                      "\"\" (and no token_file) disables them", _check_token)
    token_file: str = _key("str", "", "file holding the admin token instead (re-read on "
                           "SIGHUP; keep it 0600)")
    request_timeout: float = _key("duration", 30.0, "an admin request's headers, then its "
                                  "body, must each arrive within this; else the connection "
                                  "is closed", _positive)


@dataclass(frozen=True)
class AuthConfig:
    mode: str = _key("str", "none", "\"none\": anyone who reaches the port may connect; "
                     "\"jwt\": a client needs a token (?token= or Authorization: Bearer)",
                     _one_of("none", "jwt"))
    jwt_key: str = _key("str", "", "HS256 secret tokens are signed with (secret: better "
                        "in jwt_key_file or EBBCAST_AUTH_JWT_KEY)")
    jwt_key_file: str = _key("str", "", "file holding the HS256 secret instead (re-read on "
                             "SIGHUP)")
    jwt_public_key_file: str = _key("str", "", "PEM public key (RS256 for RSA, ES256 for EC "
                                    "P-256) or JWKS file of keys told apart by kid, instead "
                                    "of jwt_key (re-read on SIGHUP)")
    audience: str = _key("str", "", "when set, a token's aud must name it")
    leeway: float = _key("duration", 30.0, "clock skew allowed on a token's exp and nbf, at "
                         "the handshake and for the 4001 close (at most 5m)",
                         lambda v: None if v <= 300 else f"must be at most 5m, got {v:g}s")


@dataclass(frozen=True)
class BroadcastConfig:
    periodic_interval: float = _key("duration", 10.0, "periodic message cadence; 0 disables")
    periodic_text: str = _key("str", "periodic update", "text of the periodic message")
    echo_to_sender: bool = _key("bool", True, "whether a sender receives its own message")
    envelope: str = _key("str", "json", "\"json\" envelope, or \"raw\": frames relayed "
                         "verbatim, no welcome or shutdown frames", _one_of("json", "raw"))


@dataclass(frozen=True)
class KeepaliveConfig:
    ping_interval: float = _key("duration", 20.0, "WebSocket ping cadence; 0 disables pings")
    ping_timeout: float = _key("duration", 20.0, "no pong within this: connection closed")


@dataclass(frozen=True)
class LimitsConfig:
    client_queue_bytes: int = _key("int", 1048576, "bytes allowed to wait unsent for one "
                                   "client; over it: disconnected as a slow consumer",
                                   _at_least(1024))
    messages_per_second: float = _key("float", 20.0, "per-connection inbound rate; 0 = "
                                      "unlimited", _at_least(0))
    burst: int = _key("int", 40, "per-connection inbound burst (token bucket size)",
                      _at_least(1))


@dataclass(frozen=True)
class ShutdownConfig:
    drain_timeout: float = _key("duration", 1800.0, "the drain deadline",
                                _positive)
    progress_interval: float = _key("duration", 10.0, "cadence of drain progress logs and "
                                    "systemd STATUS", _positive)
    close_code: int = _key("int", 1001, "close code sent to clients still connected at the "
                           "deadline", _check_close_code)
    upgrade_spread: float = _key("duration", 30.0, "after an upgrade (SIGUSR2), the old "
                                 "generation's clients are told to reconnect spread over this")
    upgrade_timeout: float = _key("duration", 60.0, "a new generation not serving this long "
                                  "after SIGUSR2 fails the upgrade",
                                  _positive)


@dataclass(frozen=True)
class HistoryConfig:
    size: int = _key("int", 1000, "broadcasts kept for clients that resume "
                     "(/ws?since=N&epoch=E); 0 keeps none", _at_least(0))
    ttl: float = _key("duration", 300.0, "broadcasts older than this are not replayed; "
                      "0 = no age limit")
    max_channels: int = _key("int", 10000, "channels that keep a history of their own "
                             "(size and ttl each); the least recently published lose "
                             "theirs first", _at_least(1))


@dataclass(frozen=True)
class ChannelsConfig:
    max_per_connection: int = _key("int", 100, "channels one connection may subscribe to; "
                                   "over it: the too_many_channels error", _at_least(1))
    max: int = _key("int", 100000, "channels with a subscriber, per process; over it: the "
                    "too_many_channels error", _at_least(1))
    client_publish: bool = _key("bool", True, "whether clients may publish to channels "
                                "(without auth.mode = \"jwt\"; with it, the publish claim "
                                "decides)")


@dataclass(frozen=True)
class BackplaneConfig:
    url: str = _key("str", "memory://", "\"memory://\", or for several hosts "
                    "\"redis://host:port/db\" or \"redis+sentinel://host:port[,host:port...]"
                    "/master[/db]\" (Redis Sentinel)", _check_backplane)
    prefix: str = _key("str", "ebbcast", "every Redis key and channel is <prefix>:<name>; "
                       "deployments sharing one Redis each take their own", _check_prefix)
    outage_buffer: int = _key("int", 8388608, "bytes of frames each serving process keeps "
                              "while Redis is away, published once it is back; beyond "
                              "it: dropped, counted", _at_least(0))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _key("str", "info", "debug, info, warning or error", _one_of(*_LEVELS))
    format: str = _key("str", "text", "\"text\" or \"json\" (one object per line)",
                       _one_of("text", "json"))


@dataclass(frozen=True)
class SecretFiles:
    """What the files named by ``admin.token_file``, ``auth.jwt_key_file`` and
    ``auth.jwt_public_key_file`` held when the configuration was loaded (read once,
    so a file changed later takes effect at the next SIGHUP, and a bad one then is
    refused with the rest of that reload)."""

    admin_token: str = ""
    jwt_key: str = ""
    public_keys: str = ""


#: Each file read with the configuration: (its key, the SecretFiles field it fills).
SECRET_FILE_KEYS = (("admin.token_file", "admin_token"), ("auth.jwt_key_file", "jwt_key"),
                    ("auth.jwt_public_key_file", "public_keys"))


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration. Durations are float seconds. ``files``
    holds what the key files named in it held when it was loaded."""

    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    broadcast: BroadcastConfig = field(default_factory=BroadcastConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    backplane: BackplaneConfig = field(default_factory=BackplaneConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    files: SecretFiles = field(default_factory=SecretFiles, repr=False)
    #: The environment variables ignored as Kubernetes service links (logged at start).
    service_links: tuple[str, ...] = field(default=(), compare=False)

    def value(self, key: str) -> Value:
        """The value of ``"section.key"``."""
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)  # type: ignore[no-any-return]

    @property
    def tls_enabled(self) -> bool:
        return bool(self.server.tls_cert and self.server.tls_key)

    @property
    def admin_token(self) -> str:
        """The admin bearer token: ``admin.token``, or what ``admin.token_file`` held."""
        return self.admin.token or self.files.admin_token

    @property
    def jwt_secret(self) -> str:
        """The HS256 secret: ``auth.jwt_key``, or what ``auth.jwt_key_file`` held."""
        return self.auth.jwt_key or self.files.jwt_key


SECTIONS: dict[str, type] = {
    "server": ServerConfig, "admin": AdminConfig, "auth": AuthConfig,
    "broadcast": BroadcastConfig,
    "keepalive": KeepaliveConfig, "limits": LimitsConfig, "shutdown": ShutdownConfig,
    "history": HistoryConfig, "channels": ChannelsConfig, "backplane": BackplaneConfig,
    "logging": LoggingConfig,
}


def iter_keys() -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every ``("section.key", field)`` of the schema, in file order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f


def is_reloadable(key: str) -> bool:
    section = key.split(".", 1)[0]
    return key in RELOADABLE or f"{section}.*" in RELOADABLE


def changed_keys(old: Config, new: Config) -> list[str]:
    """The keys whose value differs between two configurations; a key naming a
    file counts as changed when the file's contents did."""
    changed = [key for key, _ in iter_keys() if old.value(key) != new.value(key)]
    for key, held in SECRET_FILE_KEYS:
        if key not in changed and getattr(old.files, held) != getattr(new.files, held):
            changed.append(key)
    return changed


# -- loading ----------------------------------------------------------------------

@dataclass
class _Layer:
    """Values from one source: ``{"section.key": (value, from_text, label)}``."""

    values: dict[str, tuple[object, bool, str]] = field(default_factory=dict)


def _file_layer(path: str, problems: list[tuple[str, str]]) -> _Layer:
    layer = _Layer()
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        problems.append((path, f"cannot read config file: {exc.strerror or exc}"))
        return layer
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problems.append((path, f"invalid TOML: {exc}"))
        return layer
    for section, body in document.items():
        if section not in SECTIONS:
            problems.append((section, f"unknown section [{section}] (known: "
                             f"{', '.join(SECTIONS)})"))
            continue
        if not isinstance(body, dict):
            problems.append((section, "must be a table, e.g. [" + section + "]"))
            continue
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for name, value in body.items():
            key = f"{section}.{name}"
            if name not in known:
                problems.append((key, f"unknown key in [{section}] (known: "
                                 f"{', '.join(sorted(known))})"))
            else:
                layer.values[key] = (value, False, "")
    return layer


def _env_layer(env: Mapping[str, str], problems: list[tuple[str, str]],
               ignored: list[str]) -> _Layer:
    layer = _Layer()
    known = {key: f"{ENV_PREFIX}{key.replace('.', '_').upper()}" for key, _ in iter_keys()}
    by_var = {var: key for key, var in known.items()}
    for var, text in sorted(env.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        key = by_var.get(var)
        if is_service_link(var, text):
            ignored.append(var)
        elif key is None:
            problems.append((var, "unknown ebbcast environment variable (expected "
                             "EBBCAST_<SECTION>_<KEY>, e.g. EBBCAST_SERVER_PORT)"))
        else:
            layer.values[key] = (text, True, f" (from {var})")
    return layer


def load_config(path: str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, str] | None = None) -> Config:
    """Build a validated Config from a file, environment variables and CLI overrides.

    ``overrides`` maps ``"section.key"`` to the text given on the command line.
    Raises ConfigError listing every problem found.
    """
    problems: list[tuple[str, str]] = []
    links: list[str] = []
    layers = [_file_layer(path, problems) if path else _Layer(),
              _env_layer(os.environ if env is None else env, problems, links),
              _Layer({k: (v, True, " (from the command line)")
                      for k, v in (overrides or {}).items()})]
    sections: dict[str, dict[str, Value]] = {name: {} for name in SECTIONS}
    for key, spec in iter_keys():
        section, name = key.split(".", 1)
        for layer in reversed(layers):
            if key not in layer.values:
                continue
            raw, from_text, label = layer.values[key]
            try:
                value = _coerce(spec.metadata["kind"], raw, from_text)
                check = spec.metadata["check"]
                reason = check(value) if check else None
            except ValueError as exc:
                reason = str(exc)
            if reason:
                problems.append((key, reason + label))
            else:
                sections[section][name] = value
            break
    files = SecretFiles()
    if not problems:
        problems.extend(_cross_checks(sections))
    if not problems:
        files = _read_files(sections, problems)
    if problems:
        raise ConfigError(problems)
    return Config(**{name: SECTIONS[name](**values) for name, values in sections.items()},
                  files=files, service_links=tuple(links))


def _cross_checks(sections: dict[str, dict[str, Value]]) -> list[tuple[str, str]]:
    problems = []
    cert = str(sections["server"].get("tls_cert", ""))
    key = str(sections["server"].get("tls_key", ""))
    if bool(cert) != bool(key):
        problems.append(("server.tls_cert" if not cert else "server.tls_key",
                         "tls_cert and tls_key must be set together"))
    for name, path in (("server.tls_cert", cert), ("server.tls_key", key)):
        if path and not os.path.isfile(path):
            problems.append((name, f"no such file: {path}"))
    return problems + _auth_checks(sections["auth"])


def _auth_checks(auth: dict[str, Value]) -> list[tuple[str, str]]:
    secret, public_key_file = auth.get("jwt_key", ""), str(auth.get("jwt_public_key_file", ""))
    secret = secret or auth.get("jwt_key_file", "")
    if auth.get("mode") != "jwt":
        return []
    if secret and public_key_file:
        return [("auth.jwt_key", "set auth.jwt_key or auth.jwt_key_file (HS256), or "
                 "auth.jwt_public_key_file (RS256/ES256 or a JWKS), not both")]
    if not secret and not public_key_file:
        return [("auth.mode", "\"jwt\" needs auth.jwt_key or auth.jwt_key_file (HS256 "
                 "secret) or auth.jwt_public_key_file (a public key or a JWKS)")]
    return []


def _read_files(sections: dict[str, dict[str, Value]],
                problems: list[tuple[str, str]]) -> SecretFiles:
    """Read the files the configuration names (each at most once per load)."""
    for secret, file_key in (("admin.token", "admin.token_file"),
                             ("auth.jwt_key", "auth.jwt_key_file")):
        if _get(sections, secret) and _get(sections, file_key):
            problems.append((file_key, f"{secret} and {file_key} are both set; "
                             "keep one (the file is better)"))
    held: dict[str, str] = {}
    for key, name in SECRET_FILE_KEYS:
        path = str(_get(sections, key) or "")
        if not path or (key == "auth.jwt_public_key_file"
                        and _get(sections, "auth.mode") != "jwt"):
            continue
        try:
            if key == "auth.jwt_public_key_file":
                held[name] = read_text_file(path, "a key file")
                parse_verification_keys(held[name], path)
            else:
                held[name] = read_secret_file(path)
        except ValueError as exc:
            problems.append((key, str(exc)))
    token = held.get("admin_token")
    if token and (reason := _check_token(token)):
        problems.append(("admin.token_file", f"the token in it {reason}"))
    return SecretFiles(**held)


def _get(sections: dict[str, dict[str, Value]], key: str) -> Value | None:
    section, name = key.split(".", 1)
    return sections[section].get(name)


# -- rendering --------------------------------------------------------------------

def toml_value(kind: str, value: Value) -> str:
    """A value as config/ebbcast.toml writes it (durations with their unit)."""
    if kind == "duration":
        assert isinstance(value, float)
        return json.dumps(format_duration(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def render_toml(config: Config, mask_secrets: bool = True) -> str:
    """The configuration as a commented TOML document that loads back to it."""
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            value = config.value(f"{section}.{f.name}")
            if mask_secrets and f"{section}.{f.name}" in SECRETS and value:
                value = "********"
            elif mask_secrets and f"{section}.{f.name}" == "backplane.url":
                value = _masked(str(value))
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {toml_value(f.metadata['kind'], value)}")
        lines.append("")
    return "\n".join(lines)


def merge_reloadable(running: Config, loaded: Config) -> Config:
    """``running`` with the reloadable keys taken from ``loaded`` (SIGHUP): the
    key files among them, whose contents come with their keys."""
    sections = {}
    for section, cls in SECTIONS.items():
        values = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            values[f.name] = (loaded if is_reloadable(key) else running).value(key)
        sections[section] = cls(**values)
    return Config(**sections, files=loaded.files, service_links=running.service_links)


def reload_config(running: Config, load: Callable[[], Config], quiet: bool = False,
                  note: str = "") -> tuple[Config, list[str]] | None:
    """SIGHUP's work: load the configuration again and keep only what may change.

    Returns the running configuration with the reloadable keys replaced, and the
    keys that changed; or None, after logging every problem, if the new file is
    invalid (the running configuration stays). Keys that changed but need a
    restart are logged, then the keys applied (followed by ``note``). ``quiet``
    logs all this at DEBUG, for a worker whose main process has just said the same.
    """
    def say(level: int, message: str, *args: object) -> None:
        log.log(logging.DEBUG if quiet else level, message, *args)

    say(logging.INFO, "SIGHUP: reloading the configuration")
    try:
        loaded = load()
    except ConfigError as exc:
        for key, reason in exc.problems:
            say(logging.ERROR, "config reload: %s: %s", key, reason)
        say(logging.ERROR, "config reload failed: keeping the running configuration")
        return None
    changed = changed_keys(running, loaded)
    for key in changed:
        if not is_reloadable(key):
            say(logging.WARNING, "config reload: %s changed; it needs a restart to apply", key)
    applied = [key for key in changed if is_reloadable(key)]
    say(logging.INFO, "config reloaded: %s%s", ", ".join(applied) or "no change", note)
    return merge_reloadable(running, loaded), changed
