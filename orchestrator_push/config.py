"""Configuration: read once, validated once, from the environment and overrides.

Every adapter reads the same ``ORCHESTRATOR_PUSH_*`` variables. A framework may
add a lower-priority source (Celery's ``app.conf``, Airflow's ``airflow.cfg``)
and a caller may pass explicit overrides; the precedence is
overrides > environment > framework source > defaults.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from .spool import default_dir as default_spool_dir

PREFIX = "ORCHESTRATOR_PUSH_"

log = logging.getLogger("orchestrator_push")

_METRIC_PREFIX_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

#: Labels this library sets itself, or that Prometheus/Pushgateway give a meaning.
RESERVED_LABELS = frozenset({"job", "flow", "task", "framework", "status", "instance", "le"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """An invalid setting. The message names the variable and never echoes a secret."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {problem}")


class Secret:
    """A string that does not show itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Config:
    """Validated settings. Build it with :func:`load_config`; see docs/configuration.md."""

    url: str = "http://localhost:9091"
    job: str | None = None  # None: the framework's name
    namespace: str = "orchestrator"
    labels: Mapping[str, str] = field(default_factory=dict)
    interval: float = 1.0
    enabled: bool = True
    timeout: float = 5.0
    flush_timeout: float = 5.0
    max_queue: int = 10_000
    max_groups: int = 2_000
    username: str | None = None
    password: Secret | None = None
    bearer_token: Secret | None = None
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_verify: bool = True
    #: Where undeliverable records wait for the next process; None: no spool.
    spool_dir: str | None = field(default_factory=default_spool_dir)
    spool_max_bytes: int = 64 * 1024 * 1024

    def job_for(self, framework: str) -> str:
        return self.job if self.job is not None else framework


def _bool(var: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(var, f"expected true or false, got {raw!r}")


def _positive(var: str, raw: str, kind: type[float] | type[int] = float) -> float:
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(var, f"expected a positive number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(var, f"must be greater than 0, got {raw!r}")
    return value


def _url(var: str, raw: str) -> tuple[str, str | None, Secret | None]:
    """The base URL without credentials, plus any user:password it carried."""
    try:
        parts = urlsplit(raw.strip())
        port = parts.port  # raises on a bad port
    except ValueError:
        raise ConfigError(var, "not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(var, "expected http://host:port or https://host:port")
    if parts.query or parts.fragment:
        raise ConfigError(var, "must not have a query string or fragment")
    user = unquote(parts.username) if parts.username else None
    password = Secret(unquote(parts.password)) if parts.password else None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return clean, user, password


def parse_labels(var: str, raw: str) -> dict[str, str]:
    """``k=v,k2=v2`` into a dict, refusing names this library or Prometheus reserve."""
    labels: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(var, f"expected k=v pairs separated by commas, got {item.strip()!r}")
        if not _LABEL_NAME_RE.match(name):
            raise ConfigError(var, f"{name!r} is not a valid Prometheus label name")
        if name in RESERVED_LABELS or name.startswith("__"):
            raise ConfigError(var, f"label {name!r} is reserved; choose another name")
        if name in labels:
            raise ConfigError(var, f"label {name!r} is given twice")
        if not value.strip():
            raise ConfigError(var, f"label {name!r} has an empty value")
        labels[name] = value.strip()
    return labels


def _read_secret_file(var: str, path: str) -> Secret:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError(var, f"cannot read file {path!r} ({exc.strerror})") from None
    if not value:
        raise ConfigError(var, f"file {path!r} is empty")
    return Secret(value)


def _readable_file(var: str, path: str) -> str:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(var, f"file {path!r} does not exist or is not readable")
    return path


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    fallback: Mapping[str, str] | None = None,
    **overrides: object,
) -> Config:
    """Build and validate a :class:`Config`.

    ``environ`` defaults to ``os.environ``. ``fallback`` holds the same variable
    names from a framework's own configuration, used where the environment is
    silent. ``overrides`` are :class:`Config` fields set in code; they win.

    >>> load_config({"ORCHESTRATOR_PUSH_URL": "http://gw:9091"}).url
    'http://gw:9091'
    """
    env = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    for source in (fallback or {}), env:
        merged.update({k: v for k, v in source.items() if k.startswith(PREFIX)})

    def get(name: str) -> str | None:
        value = merged.get(PREFIX + name)
        return value if value is not None and value.strip() != "" else None

    kw: dict[str, object] = {}
    if (raw := get("URL")) is not None:
        kw["url"], user, pw = _url(PREFIX + "URL", raw)
        if user is not None:
            kw["username"] = user
        if pw is not None:
            kw["password"] = pw
    if (raw := get("JOB")) is not None:
        kw["job"] = raw.strip()
    if (raw := get("NAMESPACE")) is not None:
        if not _METRIC_PREFIX_RE.match(raw.strip()):
            raise ConfigError(PREFIX + "NAMESPACE", f"{raw!r} is not a valid metric name prefix")
        kw["namespace"] = raw.strip()
    if (raw := get("LABELS")) is not None:
        kw["labels"] = parse_labels(PREFIX + "LABELS", raw)
    for name, key in (
        ("INTERVAL", "interval"),
        ("TIMEOUT", "timeout"),
        ("FLUSH_TIMEOUT", "flush_timeout"),
    ):
        if (raw := get(name)) is not None:
            kw[key] = _positive(PREFIX + name, raw)
    if (raw := get("SPOOL_DIR")) is not None:
        off = raw.strip().lower() in ("off", "false", "none", "0")
        kw["spool_dir"] = None if off else os.path.abspath(os.path.expanduser(raw.strip()))
    for name, key in (
        ("MAX_QUEUE", "max_queue"),
        ("MAX_GROUPS", "max_groups"),
        ("SPOOL_MAX_BYTES", "spool_max_bytes"),
    ):
        if (raw := get(name)) is not None:
            kw[key] = int(_positive(PREFIX + name, raw, int))
    for name, key in (("ENABLED", "enabled"), ("TLS_VERIFY", "tls_verify")):
        if (raw := get(name)) is not None:
            kw[key] = _bool(PREFIX + name, raw)
    if (raw := get("USERNAME")) is not None:
        kw["username"] = raw
    if (raw := get("PASSWORD")) is not None:
        kw["password"] = Secret(raw)
    if (raw := get("PASSWORD_FILE")) is not None:
        kw["password"] = _read_secret_file(PREFIX + "PASSWORD_FILE", raw)
    if (raw := get("BEARER_TOKEN")) is not None:
        kw["bearer_token"] = Secret(raw.strip())
    if (raw := get("BEARER_TOKEN_FILE")) is not None:
        kw["bearer_token"] = _read_secret_file(PREFIX + "BEARER_TOKEN_FILE", raw)
    for name, key in (
        ("CA_BUNDLE", "ca_bundle"),
        ("CLIENT_CERT", "client_cert"),
        ("CLIENT_KEY", "client_key"),
    ):
        if (raw := get(name)) is not None:
            kw[key] = _readable_file(PREFIX + name, raw)

    kw.update(overrides)
    for key in ("password", "bearer_token"):
        if isinstance(kw.get(key), str):
            kw[key] = Secret(str(kw[key]))
    try:
        config = Config(**kw)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError("configure()", str(exc)) from None
    _check(config)
    return config


def _check(c: Config) -> None:
    """Cross-field rules, also applied to values passed in code."""
    if c.password is not None and c.username is None:
        raise ConfigError(PREFIX + "USERNAME", "a password is set but no username")
    if c.username is not None and c.password is None:
        raise ConfigError(PREFIX + "PASSWORD", "a username is set but no password (or _FILE)")
    if c.bearer_token is not None and c.username is not None:
        raise ConfigError(PREFIX + "BEARER_TOKEN", "use either basic auth or a bearer token")
    if c.client_key is not None and c.client_cert is None:
        raise ConfigError(PREFIX + "CLIENT_CERT", "a client key needs a client certificate")
    if c.job is not None and not c.job:
        raise ConfigError(PREFIX + "JOB", "must not be empty")
    if not _METRIC_PREFIX_RE.match(c.namespace):
        raise ConfigError(
            PREFIX + "NAMESPACE", f"{c.namespace!r} is not a valid metric name prefix"
        )
    for n in ("interval", "timeout", "flush_timeout", "max_queue", "max_groups", "spool_max_bytes"):
        value = getattr(c, n)
        if not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(PREFIX + n.upper(), f"must be greater than 0, got {value!r}")
    for name, value in c.labels.items():
        if name in RESERVED_LABELS or name.startswith("__") or not _LABEL_NAME_RE.match(name):
            raise ConfigError(PREFIX + "LABELS", f"label {name!r} is reserved or invalid")
        if not isinstance(value, str) or value == "":
            # Prometheus treats an empty label value as no label at all.
            raise ConfigError(PREFIX + "LABELS", f"label {name!r} needs a non-empty value")
    if c.url.startswith("https://") and not c.tls_verify:
        log.warning("orchestrator_push: TLS certificate verification is OFF for %s", c.url)
