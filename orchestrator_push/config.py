"""Configuration: read once, validated once, from the environment and overrides.

Every adapter reads the same ``ORCHESTRATOR_PUSH_*`` variables. A framework may
add a lower-priority source (Celery's ``app.conf``, Airflow's ``airflow.cfg``)
and a caller may pass explicit overrides; the precedence is
overrides > environment > framework source > defaults.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from .durations import parse_duration
from .logs import WARNING, emit
from .spool import default_dir as default_spool_dir

PREFIX = "ORCHESTRATOR_PUSH_"

_METRIC_PREFIX_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

#: Labels this library sets itself, or that Prometheus/Pushgateway give a meaning.
RESERVED_LABELS = frozenset({"job", "flow", "task", "framework", "status", "instance", "le"})

#: Upper bounds (seconds) of the duration histograms' buckets, ``+Inf`` aside:
#: from sub-second Celery tasks to hour-long batch jobs.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
#: More buckets than this is a cardinality mistake: each is a series per task and outcome.
MAX_BUCKETS = 30
_NO_BUCKETS = frozenset({"none", "off"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """An invalid setting. The message names the variable and never echoes a secret."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
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

    #: One gateway's base URL, or several separated by commas (see :attr:`urls`).
    url: str = "http://localhost:9091"
    #: How many of the gateways hold each group (1: each group on one of them).
    replicas: int = 1
    job: str | None = None  # None: the framework's name
    namespace: str = "orchestrator"
    labels: Mapping[str, str] = field(default_factory=dict)
    interval: float = 1.0
    enabled: bool = True
    timeout: float = 5.0
    flush_timeout: float = 5.0
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
    #: Seconds after its last push that ``orchestrator-push gc`` may delete a
    #: group; None: 7 days, or more for a schedule with long intervals.
    group_ttl: float | None = None
    #: How late a scheduled run may start (Celery beat, Airflow, Prefect; exec
    #: has --grace); None: 5 minutes, or one period of the schedule if shorter.
    schedule_grace: float | None = None
    #: Upper bounds of the duration histograms' buckets in seconds, ascending;
    #: ``+Inf`` is always added. Empty: only ``+Inf`` (counts and sums).
    buckets: tuple[float, ...] = DEFAULT_BUCKETS

    @property
    def urls(self) -> tuple[str, ...]:
        """Every gateway's base URL, in the order given."""
        return tuple(self.url.split(","))

    def job_for(self, framework: str) -> str:
        return self.job if self.job is not None else framework

    def __post_init__(self) -> None:
        # A Config built directly (not by load_config) gets the same checks.
        _check(self)


def _bool(var: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    v = str(raw).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(var, f"expected true or false, got {raw!r}")


def _positive(var: str, raw: object, kind: type[float] | type[int] = float) -> float:
    if isinstance(raw, bool):
        raise ConfigError(var, f"expected a positive number, got {raw!r}")
    try:
        value = kind(raw.strip()) if isinstance(raw, str) else kind(raw)  # type: ignore[arg-type,call-overload]
    except (TypeError, ValueError):
        raise ConfigError(var, f"expected a positive number, got {raw!r}") from None
    if kind is int and isinstance(raw, float) and raw != value:
        raise ConfigError(var, f"expected a whole number, got {raw!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(var, f"must be greater than 0, got {raw!r}")
    return value


def _text(var: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise ConfigError(var, f"expected a string, got {type(raw).__name__}")
    return raw


def _url(var: str, raw: object) -> tuple[str, str | None, Secret | None]:
    """The base URL without credentials, plus any user:password it carried.
    Errors never echo the value: it may hold a password."""
    try:
        parts = urlsplit(_text(var, raw).strip())
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


def _urls(var: str, raw: object) -> tuple[str, str | None, Secret | None]:
    """One URL or several separated by commas (each checked as :func:`_url`
    does); credentials in them must be the same in every one that has any."""
    items = [item.strip() for item in _text(var, raw).split(",")]
    if any(not item for item in items):
        raise ConfigError(var, "an empty item in the list of URLs")
    parsed = [_url(var, item) for item in items]
    cleans = [clean for clean, _, _ in parsed]
    if len(set(cleans)) != len(cleans):
        raise ConfigError(var, "a gateway is listed twice")
    credentials = {(user, pw) for _, user, pw in parsed if user is not None or pw is not None}
    if len(credentials) > 1:
        raise ConfigError(var, "the URLs carry different credentials; give one user and password")
    user, pw = credentials.pop() if credentials else (None, None)
    return ",".join(cleans), user, pw


def parse_labels(var: str, raw: object) -> dict[str, str]:
    """``k=v,k2=v2`` (or a mapping, in code) into a dict, refusing names this
    library or Prometheus reserve."""
    if isinstance(raw, Mapping):  # values exactly as given in code
        pairs = [(str(k), "=", v if isinstance(v, str) else str(v)) for k, v in raw.items()]
    else:
        pairs = [item.partition("=") for item in _text(var, raw).split(",") if item.strip()]
        pairs = [(n, sep, v.strip()) for n, sep, v in pairs]
    labels: dict[str, str] = {}
    for name, sep, value in pairs:
        name = name.strip()
        if not sep:
            raise ConfigError(var, f"expected k=v pairs separated by commas, got {name!r}")
        if not _LABEL_NAME_RE.match(name):
            raise ConfigError(var, f"{name!r} is not a valid Prometheus label name")
        if name in RESERVED_LABELS or name.startswith("__"):
            raise ConfigError(var, f"label {name!r} is reserved; choose another name")
        if name in labels:
            raise ConfigError(var, f"label {name!r} is given twice")
        if not value:
            raise ConfigError(var, f"label {name!r} has an empty value")
        labels[name] = value
    return labels


def _read_secret_file(var: str, raw: object) -> Secret:
    path = _text(var, raw)
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError(var, f"cannot read file {path!r} ({exc.strerror})") from None
    if not value:
        raise ConfigError(var, f"file {path!r} is empty")
    return Secret(value)


def _readable_file(var: str, raw: object) -> str:
    path = _text(var, raw)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(var, f"file {path!r} does not exist or is not readable")
    return path


#: Every setting, by variable name (without the prefix) -> Config field. The
#: field's name is the variable's in lower case: ``configure(interval=2)`` and
#: ``ORCHESTRATOR_PUSH_INTERVAL=2`` go through the same parser.
_FIELDS = {f.name.upper(): f.name for f in dataclasses.fields(Config)}
_SETTINGS = (*_FIELDS, "PASSWORD_FILE", "BEARER_TOKEN_FILE")
_SPOOL_OFF = frozenset({"off", "false", "none", "0", "no"})


def _secret(var: str, raw: object) -> Secret:
    return raw if isinstance(raw, Secret) else Secret(_text(var, raw).strip())


def _spool_dir(var: str, raw: object) -> str | None:
    if raw is None or raw is False:
        return None
    text = _text(var, raw).strip()
    if text.lower() in _SPOOL_OFF:
        return None
    return os.path.abspath(os.path.expanduser(text))


def _namespace(var: str, raw: object) -> str:
    text = _text(var, raw).strip()
    if not _METRIC_PREFIX_RE.match(text):
        raise ConfigError(var, f"{text!r} is not a valid metric name prefix")
    return text


def _seconds(var: str, raw: object) -> float:
    """A positive number of seconds, or a duration like ``7d`` or ``12h``."""
    if isinstance(raw, str) and raw.strip() and raw.strip()[-1].isalpha():
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(var, str(exc)) from None
    return _positive(var, raw)


def _buckets(var: str, raw: object) -> tuple[float, ...]:
    """``0.1,1,10`` (durations such as ``5m`` too), ``none``, or a sequence in code."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in _NO_BUCKETS:
            return ()
        items: list[object] = [item.strip() for item in text.split(",")]
        if any(item == "" for item in items):
            raise ConfigError(var, "an empty item in the list of bucket bounds")
        if any(str(item).lower() in ("inf", "+inf") for item in items):
            raise ConfigError(var, "+Inf is always added; list only the finite bounds")
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise ConfigError(var, f"expected bounds in seconds separated by commas, got {raw!r}")
    bounds = tuple(float(_seconds(var, item)) for item in items)
    check_buckets(bounds)  # here too, so an error names the source it came from
    return bounds


def _optional_text(var: str, raw: object) -> str | None:
    return None if raw is None else _text(var, raw).strip()


_PARSERS: dict[str, Callable[[str, object], object]] = {
    "JOB": _optional_text,
    "NAMESPACE": _namespace,
    "LABELS": parse_labels,
    "INTERVAL": _positive,
    "TIMEOUT": _positive,
    "FLUSH_TIMEOUT": _positive,
    "SPOOL_DIR": _spool_dir,
    "GROUP_TTL": lambda var, raw: None if raw is None else _seconds(var, raw),
    "SCHEDULE_GRACE": lambda var, raw: None if raw is None else _seconds(var, raw),
    "BUCKETS": _buckets,
    "REPLICAS": lambda var, raw: int(_positive(var, raw, int)),
    "MAX_GROUPS": lambda var, raw: int(_positive(var, raw, int)),
    "SPOOL_MAX_BYTES": lambda var, raw: int(_positive(var, raw, int)),
    "ENABLED": _bool,
    "TLS_VERIFY": _bool,
    "USERNAME": lambda var, raw: None if raw is None else _text(var, raw),
    "PASSWORD": lambda var, raw: None if raw is None else _secret(var, raw),
    "PASSWORD_FILE": _read_secret_file,
    "BEARER_TOKEN": lambda var, raw: None if raw is None else _secret(var, raw),
    "BEARER_TOKEN_FILE": _read_secret_file,
    "CA_BUNDLE": lambda var, raw: None if raw is None else _readable_file(var, raw),
    "CLIENT_CERT": lambda var, raw: None if raw is None else _readable_file(var, raw),
    "CLIENT_KEY": lambda var, raw: None if raw is None else _readable_file(var, raw),
}
#: Where a ``_FILE`` variable's value goes.
_TARGET = {"PASSWORD_FILE": "PASSWORD", "BEARER_TOKEN_FILE": "BEARER_TOKEN"}


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    fallback: Mapping[str, str] | None = None,
    fallback_source: str | None = None,
    **overrides: object,
) -> Config:
    """Build and validate a :class:`Config`.

    ``environ`` defaults to ``os.environ``. ``fallback`` holds the same variable
    names from a framework's own configuration, used where the environment is
    silent; ``fallback_source`` names where it came from in error messages (a
    template with ``{name}``, such as ``"airflow.cfg [orchestrator_push] {name}"``).
    ``overrides`` are settings in code, by field name (``url=``, ``interval=``,
    ``spool_dir="off"``...); they win. Every source goes through the same
    parsing and validation.

    >>> load_config({"ORCHESTRATOR_PUSH_URL": "http://gw:9091"}).url
    'http://gw:9091'
    >>> load_config({}, spool_dir="off").spool_dir is None
    True
    """
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    origin: dict[str, str] = {}
    for source, values in (("fallback", fallback or {}), ("env", env)):  # env wins
        for name, value in values.items():
            if name.startswith(PREFIX) and value is not None and str(value).strip() != "":
                raw[name[len(PREFIX) :]], origin[name[len(PREFIX) :]] = value, source
    for key, given in overrides.items():
        name = key.upper()
        if name not in _SETTINGS or key != key.lower():
            raise ConfigError(f"configure({key}=...)", "no such setting") from None
        raw[name], origin[name] = given, "code"
        # a value in code wins over its _FILE variant from elsewhere, and the reverse
        for a, b in _TARGET.items():
            if name == b and origin.get(a) != "code":
                raw.pop(a, None)
            elif name == a and origin.get(b) != "code":
                raw.pop(b, None)

    kw: dict[str, object] = {}
    # the URL first (its user:password), the _FILE variables last (they win)
    for name, setting in sorted(raw.items(), key=lambda kv: (kv[0] != "URL", kv[0] in _TARGET)):
        var = PREFIX + name
        try:
            if name == "URL":
                kw["url"], user, pw = _urls(var, setting)
                if user is not None:
                    kw["username"] = user
                if pw is not None:
                    kw["password"] = pw
            elif name in _PARSERS:
                kw[_FIELDS[_TARGET.get(name, name)]] = _PARSERS[name](var, setting)
        except ConfigError as exc:
            if origin[name] == "fallback" and fallback_source:
                where = fallback_source.format(name=name.lower(), NAME=name)
                raise ConfigError(var, f"{exc.problem} (set in {where})") from None
            raise
    try:
        return Config(**kw)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError("configure()", str(exc)) from None


def _check(c: Config) -> None:
    """Rules every Config obeys, however it was built."""
    _clean_url, url_user, url_password = _urls(PREFIX + "URL", c.url)
    if url_user is not None or url_password is not None:
        raise ConfigError(
            PREFIX + "URL",
            "credentials in the URL: build the configuration with load_config() or "
            "configure(), or set ORCHESTRATOR_PUSH_USERNAME and ORCHESTRATOR_PUSH_PASSWORD",
        )
    for name in ("password", "bearer_token"):
        if getattr(c, name) is not None and not isinstance(getattr(c, name), Secret):
            raise ConfigError(PREFIX + name.upper(), "expected a Secret")
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
    optional = ("group_ttl", "schedule_grace")
    if not isinstance(c.replicas, int) or not 1 <= c.replicas <= len(c.urls):
        raise ConfigError(
            PREFIX + "REPLICAS",
            f"must be a whole number from 1 to the number of gateways ({len(c.urls)}), "
            f"got {c.replicas!r}",
        )
    for n in ("interval", "timeout", "flush_timeout", "max_groups", "spool_max_bytes", *optional):
        value = getattr(c, n)
        if n in optional and value is None:
            continue
        if not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(PREFIX + n.upper(), f"must be greater than 0, got {value!r}")
    check_buckets(c.buckets)
    for name, value in c.labels.items():
        if name in RESERVED_LABELS or name.startswith("__") or not _LABEL_NAME_RE.match(name):
            raise ConfigError(PREFIX + "LABELS", f"label {name!r} is reserved or invalid")
        if not isinstance(value, str) or value == "":
            # Prometheus treats an empty label value as no label at all.
            raise ConfigError(PREFIX + "LABELS", f"label {name!r} needs a non-empty value")
    for url in c.urls:
        if url.startswith("https://") and not c.tls_verify:
            emit(WARNING, "orchestrator_push: TLS certificate verification is OFF for %s", url)


def check_buckets(bounds: object) -> None:
    """Raise ConfigError unless ``bounds`` are a valid tuple of finite bucket bounds."""
    var = PREFIX + "BUCKETS"
    if not isinstance(bounds, tuple) or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds
    ):
        raise ConfigError(var, "expected a tuple of numbers (seconds)")
    if len(bounds) > MAX_BUCKETS:
        raise ConfigError(var, f"at most {MAX_BUCKETS} bounds, got {len(bounds)}")
    if any(not math.isfinite(b) or b <= 0 for b in bounds):
        raise ConfigError(var, "every bound must be a finite number of seconds above 0")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ConfigError(var, f"bounds must be in ascending order, each once, got {bounds!r}")
