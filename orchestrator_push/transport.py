"""HTTP to the Pushgateway: one keep-alive connection pool, auth and TLS, no retries.

Retries and backoff are the engine's business; this module does one request
and says what happened, as plain data.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass

import urllib3
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from .config import Config

_BODY_LIMIT = 300  # enough of a Pushgateway error message to be useful in a log line


@dataclass(frozen=True, slots=True)
class Outcome:
    """``status`` is the HTTP status, or 0 when no answer came (``error`` says why)."""

    status: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (200, 202)

    @property
    def retryable(self) -> bool:
        # No answer, a server error, or 429: worth trying again later. Any other
        # 4xx will be refused again: retrying only adds load.
        return self.status == 0 or self.status >= 500 or self.status == 429


class Transport:
    def __init__(self, config: Config) -> None:
        self._base = config.url
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
        return f"Transport({self._base!r})"

    def request(self, method: str, path: str, body: bytes = b"") -> Outcome:
        return self.fetch(method, path, body)[0]

    def fetch(
        self, method: str, path: str, body: bytes = b"", read_timeout: float | None = None
    ) -> tuple[Outcome, bytes]:
        """One request; the answer's body too (empty unless it succeeded).
        ``read_timeout`` overrides the configured one (reading every group of a
        big gateway takes longer than one push)."""
        try:
            resp = self._pool.request(
                method,
                self._base + path,
                body=body or None,
                headers=self._headers,
                redirect=False,
                preload_content=True,
                timeout=self._timeout
                if read_timeout is None
                else urllib3.Timeout(connect=self._timeout.connect_timeout, read=read_timeout),
            )
        except urllib3.exceptions.HTTPError as exc:
            return Outcome(0, _describe(exc)), b""
        except (OSError, ValueError) as exc:
            return Outcome(0, type(exc).__name__), b""
        if resp.status in (200, 202):
            return Outcome(resp.status), resp.data
        text = resp.data[:_BODY_LIMIT].decode("utf-8", errors="replace").strip()
        return Outcome(resp.status, text or (resp.reason or "")), b""

    def close(self) -> None:
        self._pool.clear()


def _describe(exc: Exception) -> str:
    """A short reason without the URL's credentials or request headers."""
    reason = getattr(exc, "reason", None)
    inner = reason if isinstance(reason, Exception) else exc
    name = type(inner).__name__
    if isinstance(inner, urllib3.exceptions.NewConnectionError):
        return "connection refused or unreachable"
    if isinstance(
        inner, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError)
    ):
        return "timed out"
    if isinstance(inner, urllib3.exceptions.SSLError) or "SSL" in name:
        return f"TLS error: {str(inner)[:200]}"
    return name
