"""HTTP to the Pushgateway: one keep-alive connection pool, auth and TLS, no retries.

The contract (:class:`Transport`): one request in, one :class:`Outcome` out,
never an exception. Retries and backoff are the sender's business
(sender.py); this module only says what happened, as plain data with a typed
:class:`Reason`.
"""

from __future__ import annotations

import base64

# The first connection to a host name given as text encodes it with the idna
# codec, which Python imports on first use. Done on the sender's thread, that
# import can be cut by a fork (Celery's prefork pool forks while the sender
# makes its first push): the child inherits the module's import lock held by a
# thread it does not have, and hangs at its own first connection (a Celery pool
# child storing its first result). So import it here, before any thread starts.
import encodings.idna  # noqa: F401
import ssl
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import urllib3
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


@dataclass(frozen=True, slots=True)
class Outcome:
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


class HttpTransport:
    """:class:`Transport` over urllib3."""

    def __init__(self, config: Config, url: str | None = None) -> None:
        """``url``: one of ``config.urls`` (the first by default)."""
        self._base = config.urls[0] if url is None else url
        self._headers = {
            "Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
            "User-Agent": "orchestrator-push",
        }
        if config.username is not None and config.password is not None:
            token = f"{config.username}:{config.password.reveal()}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        elif config.bearer_token is not None:
            self._headers["Authorization"] = "Bearer " + config.bearer_token.reveal()
        tls: dict[str, object] = {}
        if self._base.startswith("https://"):
            tls = {
                "cert_reqs": ssl.CERT_REQUIRED if config.tls_verify else ssl.CERT_NONE,
                "ca_certs": config.ca_bundle,
                "cert_file": config.client_cert,
                "key_file": config.client_key,
            }
            if not config.tls_verify:
                tls["assert_hostname"] = False
        self._timeout = urllib3.Timeout(connect=config.timeout, read=config.timeout)
        self._pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=1,
            retries=False,
            timeout=self._timeout,
            **tls,  # type: ignore[arg-type]
        )

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
        headers = self._headers
        if content_type is not None:
            headers = {**headers, "Content-Type": content_type}
        try:
            resp = self._pool.request(
                method,
                self._base + path,
                body=body or None,
                headers=headers,
                redirect=False,
                preload_content=True,
                timeout=self._timeout
                if read_timeout is None
                else urllib3.Timeout(connect=self._timeout.connect_timeout, read=read_timeout),
            )
        except urllib3.exceptions.HTTPError as exc:
            return Outcome(0, *_describe(exc)), b""
        except (OSError, ValueError) as exc:
            return Outcome(0, type(exc).__name__, Reason.CONNECTION), b""
        if resp.status in (200, 202):
            return Outcome(resp.status), resp.data
        text = resp.data[:_BODY_LIMIT].decode("utf-8", errors="replace").strip()
        return Outcome(resp.status, text or (resp.reason or ""), Reason.HTTP), b""

    def catch_up(self) -> None:
        pass  # one gateway: nothing is held back here

    def close(self) -> None:
        self._pool.clear()


def _describe(exc: Exception) -> tuple[str, Reason]:
    """A short text without the URL's credentials or request headers, and its class."""
    reason = getattr(exc, "reason", None)
    inner = reason if isinstance(reason, Exception) else exc
    name = type(inner).__name__
    if isinstance(inner, urllib3.exceptions.NewConnectionError):
        return "connection refused or unreachable", Reason.CONNECTION
    if isinstance(
        inner, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError)
    ):
        return "timed out", Reason.TIMEOUT
    if isinstance(inner, urllib3.exceptions.SSLError) or "SSL" in name:
        return f"TLS error: {str(inner)[:200]}", Reason.TLS
    return name, Reason.CONNECTION
