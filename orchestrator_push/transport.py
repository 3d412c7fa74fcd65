"""HTTP to the Pushgateway: one keep-alive connection, auth and TLS, no retries.

The contract (:class:`Transport`): one request in, one :class:`Outcome` out,
never an exception. Retries and backoff are the sender's business
(sender.py); this module only says what happened, as plain data with a typed
:class:`Reason`.
"""

from __future__ import annotations

import base64
import errno
import http.client
import socket
import ssl
import threading
from enum import Enum
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from .config import Config

_BODY_LIMIT = 300  # enough of a Pushgateway error message to be useful in a log line


class Reason(str, Enum):
    """Why a request did not succeed (the ``reason`` label of the failure self-metric)."""

    NONE = ""  # it succeeded
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    TLS = "tls"
    HTTP = "http"  # an answer that was not 200/202: the label is http_<status>


class Outcome(NamedTuple):
    """``status`` is the HTTP status, or 0 when no answer came (``error`` says
    why, ``reason`` classifies it)."""

    status: int
    error: str = ""
    reason: Reason = Reason.NONE

    @property
    def label(self) -> str:
        """The failure's name in self-metrics: ``connection``, ``timeout``,
        ``tls`` or ``http_<status>``."""
        return f"http_{self.status}" if self.reason is Reason.HTTP else self.reason.value

    @property
    def ok(self) -> bool:
        return self.status in (200, 202)

    @property
    def retryable(self) -> bool:
        # No answer, a server error, or 429: worth trying again later. Any other
        # 4xx will be refused again: retrying only adds load.
        return self.status == 0 or self.status >= 500 or self.status == 429


class Transport(Protocol):
    """What the sender, the replayer and the admin commands need of the network."""

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str | None = None
    ) -> Outcome: ...

    def fetch(
        self, method: str, path: str, body: bytes = b"", read_timeout: float | None = None
    ) -> tuple[Outcome, bytes]: ...

    def catch_up(self) -> None:
        """After each sender cycle: deliver what was held back (several gateways)."""

    def close(self) -> None: ...


def connect(config: Config) -> Transport:
    """The transport for ``config``: one gateway's, or a
    :class:`~.gateways.Gateways` over several."""
    if len(config.urls) == 1:
        return HttpTransport(config)
    from .gateways import Gateways  # only processes with several gateways need it

    return Gateways(config)


class HttpTransport:
    """:class:`Transport` over one keep-alive :mod:`http.client` connection.

    The standard library's client rather than urllib3: one connection to one
    gateway is all a process needs (the sender is one thread), and urllib3's
    import alone cost an ``exec`` run more than half of its start-up. Safe to
    share between threads (one request at a time)."""

    def __init__(self, config: Config, url: str | None = None) -> None:
        """``url``: one of ``config.urls`` (the first by default)."""
        self._base = config.urls[0] if url is None else url
        parts = urlsplit(self._base)
        self._host, self._port = parts.hostname or "", parts.port
        self._prefix = parts.path.rstrip("/")
        self._headers = {
            "Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
            "User-Agent": "orchestrator-push",
        }
        if config.username is not None and config.password is not None:
            token = f"{config.username}:{config.password.reveal()}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        elif config.bearer_token is not None:
            self._headers["Authorization"] = "Bearer " + config.bearer_token.reveal()
        self._timeout = config.timeout
        self._tls: ssl.SSLContext | None = None
        self._tls_error = ""
        if parts.scheme == "https":
            try:
                self._tls = _tls_context(config)
            except (OSError, ValueError) as exc:  # unreadable CA or key: every request says so
                self._tls_error = f"TLS error: {type(exc).__name__}: {str(exc)[:200]}"
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpTransport({self._base!r})"

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str | None = None
    ) -> Outcome:
        """``content_type``: the body's, when it is not the text format."""
        return self.fetch(method, path, body, content_type=content_type)[0]

    def fetch(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        read_timeout: float | None = None,
        content_type: str | None = None,
    ) -> tuple[Outcome, bytes]:
        """One request; the answer's body too (empty unless it succeeded).
        ``read_timeout`` overrides the configured one (reading every group of a
        big gateway takes longer than one push)."""
        if self._tls_error:
            return Outcome(0, self._tls_error, Reason.TLS), b""
        headers = self._headers
        if content_type is not None:
            headers = {**headers, "Content-Type": content_type}
        with self._lock:
            try:
                status, reason, data = self._exchange(
                    method, self._prefix + path, body, headers, read_timeout
                )
            except Exception as exc:
                self.close()
                return Outcome(0, *_describe(exc)), b""
        if status in (200, 202):
            return Outcome(status), data
        text = data[:_BODY_LIMIT].decode("utf-8", errors="replace").strip()
        return Outcome(status, text or reason, Reason.HTTP), b""

    def _exchange(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: dict[str, str],
        read_timeout: float | None,
    ) -> tuple[int, str, bytes]:
        """Send and read the whole answer. A kept-alive connection the gateway
        closed meanwhile fails at once: the request goes again, once, on a new one."""
        for attempt in (0, 1):
            reused = self._conn is not None and self._conn.sock is not None
            conn = self._connection()
            try:
                conn.timeout = self._timeout  # connect
                if conn.sock is None:
                    conn.connect()
                conn.sock.settimeout(read_timeout or self._timeout)
                conn.request(method, target, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused and attempt == 0:
                    continue
                raise
            if resp.will_close:
                self.close()
            return resp.status, resp.reason or "", data
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._tls is not None:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._tls
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
        return self._conn

    def catch_up(self) -> None:
        pass  # one gateway: nothing is held back here

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _tls_context(config: Config) -> ssl.SSLContext:
    """Verification on unless switched off; the CA bundle and client
    certificate as configured."""
    ctx = ssl.create_default_context(cafile=config.ca_bundle)
    if not config.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.client_cert is not None:
        ctx.load_cert_chain(config.client_cert, config.client_key)
    return ctx


def _describe(exc: Exception) -> tuple[str, Reason]:
    """A short text without the URL's credentials or request headers, and its class."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return f"TLS error: {str(exc)[:200]}", Reason.TLS
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return "timed out", Reason.TIMEOUT
    if isinstance(exc, ConnectionRefusedError | socket.gaierror) or (
        isinstance(exc, OSError)
        and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL)
    ):
        return "connection refused or unreachable", Reason.CONNECTION
    return type(exc).__name__, Reason.CONNECTION
