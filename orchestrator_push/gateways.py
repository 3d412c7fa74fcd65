"""Several Pushgateways behind one :class:`~.transport.Transport`: each group on
``replicas`` of them, chosen by rendezvous hashing of its grouping key.

The sender, the replayer and the admin commands see one gateway. A push goes
to the group's replicas; it counts as delivered once one of them took it, and
what a replica missed is kept for it (``hints``, newest state per group, bounded
by ``max_groups``) and sent, in order, before anything else this process sends
to it once it answers again. A replica that did not answer is skipped for a
while (1 s, doubling up to 30 s), so a dead gateway costs one timeout, not one
per push. A DELETE goes to every gateway: a group moved by a change to the list
leaves its old copy behind. Reading every group (``GET /api/v1/metrics``) reads
every gateway and keeps, of each group, the most recently pushed copy.

Rendezvous hashing: a group's gateways are the ``replicas`` with the highest
hash of (gateway URL, group path). Adding a gateway moves only the groups it
now wins (about 1/n of them); removing one moves only its own. Every process
must list the same URLs (the order does not matter).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import Config
from .groups import GatewayError, first_value, read_json
from .logs import warn_limited
from .transport import HttpTransport, Outcome, Reason, Transport

METRICS = "/api/v1/metrics"
#: A gateway that did not answer is not tried again for this long, doubling
#: after each failed try up to SKIP_MAX.
SKIP_MIN = 1.0
SKIP_MAX = 30.0
#: POSTs a replica missed, kept per group, the newest ones, sent in order: each
#: merges into the group (a newer one need not carry every series an older
#: one set). A PUT or DELETE replaces them.
HINTS_PER_GROUP = 16


def rank(urls: Sequence[str], path: str) -> list[int]:
    """Indexes of ``urls``, best first, for the group at ``path`` (pure)."""

    import hashlib  # here: only processes with several gateways need it

    def score(i: int) -> bytes:
        return hashlib.blake2b(f"{urls[i]}\n{path}".encode(), digest_size=8).digest()

    return sorted(range(len(urls)), key=score, reverse=True)


@dataclass(eq=False)
class _Request:
    method: str
    body: bytes
    content_type: str | None


@dataclass(eq=False)
class Member:
    """One gateway of the set: its transport, when to try it again, and what it missed."""

    url: str
    transport: Transport
    skip_until: float = 0.0
    skip: float = 0.0
    hints: OrderedDict[str, list[_Request]] = field(default_factory=OrderedDict)

    def send(self, method: str, path: str, body: bytes, content_type: str | None) -> Outcome:
        if time.monotonic() < self.skip_until:
            return Outcome(0, "skipped: it did not answer a moment ago", Reason.CONNECTION)
        if method != "POST":  # replaces the whole group: what it missed of it is moot
            self.hints.pop(path, None)
        if self.hints and not self.drain():
            return Outcome(0, "skipped: it did not take what it missed", Reason.CONNECTION)
        outcome = self.transport.request(method, path, body, content_type)
        self._note(outcome)
        return outcome

    def _note(self, outcome: Outcome) -> None:
        if outcome.retryable:
            self.skip = min(max(self.skip * 2, SKIP_MIN), SKIP_MAX)
            self.skip_until = time.monotonic() + self.skip
        else:
            self.skip, self.skip_until = 0.0, 0.0

    def drain(self) -> bool:
        """Send what this gateway missed, oldest group first; False if it failed."""
        while self.hints:
            path, requests = next(iter(self.hints.items()))
            while requests:
                r = requests[0]
                outcome = self.transport.request(r.method, path, r.body, r.content_type)
                self._note(outcome)
                if outcome.retryable:
                    return False
                requests.pop(0)  # taken, or refused for good: refused again later too
            del self.hints[path]
        return True

    def hint(self, method: str, path: str, body: bytes, content_type: str | None) -> None:
        requests = self.hints.pop(path, [])
        if method != "POST":
            requests = []
        requests.append(_Request(method, body, content_type))
        self.hints[path] = requests[-HINTS_PER_GROUP:]


class Gateways:
    """:class:`~.transport.Transport` over every gateway of ``config.urls``."""

    def __init__(self, config: Config) -> None:
        self._replicas = config.replicas
        self._max_groups = config.max_groups
        self.members = [Member(url, HttpTransport(config, url)) for url in config.urls]
        #: The gateways the last read of every group could not read.
        self.unreachable: list[str] = []

    def __repr__(self) -> str:
        return f"Gateways({[m.url for m in self.members]!r}, replicas={self._replicas})"

    def targets(self, path: str) -> list[Member]:
        """The gateways that hold the group at ``path``."""
        urls = [m.url for m in self.members]
        return [self.members[i] for i in rank(urls, path)[: self._replicas]]

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str | None = None
    ) -> Outcome:
        targets = self.members if method == "DELETE" else self.targets(path)
        outcomes = [m.send(method, path, body, content_type) for m in targets]
        took = [o for o in outcomes if o.ok]
        if not took:  # the caller retries (or spools) the whole of it
            return next((o for o in outcomes if o.retryable), outcomes[0])
        for m, o in zip(targets, outcomes, strict=True):
            if o.retryable:
                self._keep_for(m, method, path, body, content_type, o)
        return took[0]

    def _keep_for(
        self,
        m: Member,
        method: str,
        path: str,
        body: bytes,
        content_type: str | None,
        outcome: Outcome,
    ) -> None:
        m.hint(method, path, body, content_type)
        if len(m.hints) > self._max_groups:
            m.hints.popitem(last=False)
            warn_limited(
                f"hints-full-{m.url}",
                "orchestrator_push: %s has been unreachable for more than %d groups' "
                "changes; the oldest it missed are only on the other replicas",
                m.url,
                self._max_groups,
            )
        warn_limited(
            f"replica-{m.url}",
            "orchestrator_push: %s did not take a push (%s); another replica did, and "
            "%d groups' changes wait for it",
            m.url,
            outcome.error or outcome.label,
            len(m.hints),
        )

    def catch_up(self) -> None:
        """Send each replica what it missed, once it may be tried again (the
        sender calls this after every cycle: a replica back from an outage gets
        it even when nothing new is pushed to it)."""
        for m in self.members:
            if m.hints and time.monotonic() >= m.skip_until:
                m.drain()

    def fetch(
        self, method: str, path: str, body: bytes = b"", read_timeout: float | None = None
    ) -> tuple[Outcome, bytes]:
        if method == "GET" and path == METRICS:
            return self._read_all()
        # anything else (the gateway's status): the first gateway that answers
        first: tuple[Outcome, bytes] | None = None
        for m in self.members:
            answer = m.transport.fetch(method, path, body, read_timeout)
            if answer[0].ok:
                return answer
            first = first or answer
        assert first is not None  # there is always at least one
        return first

    def _read_all(self) -> tuple[Outcome, bytes]:
        """Every gateway's groups, one copy of each: the one pushed last."""
        newest: dict[tuple[tuple[str, str], ...], tuple[float, object]] = {}
        failed: list[Outcome] = []
        self.unreachable = []
        for m in self.members:
            try:
                data = read_json(m.transport, METRICS) or []
            except GatewayError as exc:
                self.unreachable.append(m.url)
                failed.append(exc.outcome)
                continue
            for entry in data:
                key = tuple(sorted(entry.get("labels", {}).items()))
                pushed = first_value(entry.get("push_time_seconds")) or 0.0
                if key not in newest or pushed > newest[key][0]:
                    newest[key] = (pushed, entry)
        if len(failed) == len(self.members):
            return failed[0], b""
        if self.unreachable:
            warn_limited(
                "read-partial",
                "orchestrator_push: cannot read %s; what they alone hold is not seen",
                ", ".join(self.unreachable),
            )
        merged = [entry for _, entry in newest.values()]
        return Outcome(200), json.dumps({"status": "success", "data": merged}).encode()

    def close(self) -> None:
        for m in self.members:
            m.transport.close()
