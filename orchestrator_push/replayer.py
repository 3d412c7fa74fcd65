"""The replayer: deliver the spool, oldest files first, never overwriting a newer
value the gateway holds.

Used by every engine's sender (every 30 s while it reaches the gateway) and,
on its own, by ``orchestrator-push replay``. One pass claims up to
``REPLAY_BATCH`` files (claims are renames: several processes never take the
same file), merges their group states, gives a group the process itself still
has to push to that process (``absorb``: its next push carries whichever is
newer), reads the gateway once and pushes only what is newer than what it
holds. A file is deleted only once everything in it was delivered, was older
than the gateway's value, or was refused for good; on no answer, a 5xx, a 429
or refused credentials every claimed file goes back for later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client.metrics_core import Metric

from . import schema
from .config import Config
from .ledger import Ledger, Loss
from .logs import ERROR, INFO, WARNING, emit, warn_limited
from .schema import GroupKey, GroupKind
from .sender import Action, policy
from .spool import Entry, Spool
from .table import Group
from .transport import Transport

if TYPE_CHECKING:
    from .groups import GroupInfo

REPLAY_BATCH = 50

#: (namespace, kind, key, the merged spooled state) -> True if the caller took it.
Absorb = Callable[[str, GroupKind, GroupKey, Entry], bool]


class PassResult(NamedTuple):
    """What one replay pass did."""

    files: int  # files claimed and settled in this pass
    more: bool  # the spool may hold more to replay now (this pass found files)
    failed: bool  # the gateway could not take them (all released for later)


class Replayer:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        ledger: Ledger,
        absorb: Absorb | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self._config = config
        self.spool = spool
        self._ledger = ledger
        self._absorb = absorb
        self._stop = stop

    def run_all(self, transport: Transport) -> bool:
        """Replay until no file is left to claim or the gateway fails; True when
        no unclaimed file is left (files other processes hold are theirs)."""
        while True:
            result = self.run_pass(transport)
            if result.failed:
                return False
            if not result.more:
                return self.spool.waiting() == 0

    def run_pass(self, transport: Transport) -> PassResult:
        claimed = list(self.spool.claim(REPLAY_BATCH, self._unreadable))
        if not claimed:
            return PassResult(0, False, False)
        merged: dict[tuple[str, GroupKey], Group] = {}
        for _path, entries in claimed:
            for e in entries:
                g = merged.get((e.namespace, e.key))
                if g is None:
                    framework = e.last.framework if e.last is not None else ""
                    g = merged[(e.namespace, e.key)] = Group(GroupKind(e.kind), e.key, framework)
                g.merge(e)
        delivered = 0  # counted once the pass ends: a released file comes back
        if self._absorb is not None:
            for (ns, key), g in list(merged.items()):
                if self._absorb(ns, g.kind, key, g.entry(ns)):
                    del merged[(ns, key)]
                    delivered += g.pending
        current: dict[tuple[str, GroupKey], GroupInfo] = {}
        if merged:
            # Only a pass with files reads the gateway: every process's start
            # (an `exec` run's) checks the spool, few find anything.
            from .groups import GatewayError, parse_groups, read_json

            try:
                data = read_json(transport, "/api/v1/metrics") or []
            except GatewayError as exc:
                auth = exc.outcome.status in (401, 403)
                warn_limited(
                    "replay-read",
                    "orchestrator_push: cannot read %s before replaying the spool (%s)%s; "
                    "the files stay in %s",
                    self._config.url,
                    exc,
                    "; check the credentials" if auth else "",
                    self.spool.directory,
                    level=ERROR if auth else WARNING,
                )
                return self._release(claimed)
            for ns in {ns for ns, _ in merged}:
                for info in parse_groups(data, ns):
                    if info.kind in (GroupKind.TASK, GroupKind.FLOW):
                        current[(ns, tuple(sorted(info.labels.items())))] = info
        for (ns, key), g in merged.items():
            families = _newer_than(ns, g, current.get((ns, tuple(sorted(key)))))
            if not families:
                delivered += g.pending  # the gateway already knows better
                continue
            if self._stop():
                return self._release(claimed)
            outcome = transport.request("POST", g.path, schema.encode(families))
            action = policy(outcome)
            if action is Action.DONE:
                delivered += g.pending
            elif action is Action.REJECT:
                self._ledger.lose(Loss.REJECTED, g.pending, own=False)
            else:  # RETRY, KEEP: replay is idempotent, all of it again later
                if action is Action.KEEP:
                    warn_limited(
                        f"replay-auth-{outcome.status}",
                        "orchestrator_push: %s refused the credentials (HTTP %d) while "
                        "replaying the spool; the files stay in %s",
                        self._config.url,
                        outcome.status,
                        self.spool.directory,
                        level=ERROR,
                    )
                return self._release(claimed)
        for path, _ in claimed:
            self.spool.done(path)
        self._ledger.replayed(delivered)
        emit(
            INFO,
            "orchestrator_push: replayed %d spool files to %s",
            len(claimed),
            self._config.url,
        )
        return PassResult(len(claimed), True, False)

    def _release(self, claimed: list[tuple[str, list[Entry]]]) -> PassResult:
        for path, _ in claimed:
            self.spool.release(path)
        return PassResult(0, False, True)

    def _unreadable(self, path: str) -> None:
        self._ledger.lose(Loss.SPOOL_UNREADABLE, own=False)
        warn_limited(
            "spool-unreadable",
            "orchestrator_push: spool file %s cannot be read; set aside as %s.bad "
            "(its records are lost; removed after %d days)",
            path,
            path,
            int(self.spool.bad_max_age // 86400),
        )


def _newer_than(ns: str, g: Group, at_gateway: GroupInfo | None) -> list[Metric]:
    """The spooled values the gateway does not already hold newer ones of."""
    last, success_at, failure_at = g.last, g.success_at, g.failure_at
    if at_gateway is not None:
        done_at = at_gateway.completed_at
        if last is not None and done_at is not None and last.end_time <= done_at:
            last = None
        if success_at is not None and (at_gateway.success_at or 0) >= success_at:
            success_at = None
        if failure_at is not None and (at_gateway.failure_at or 0) >= failure_at:
            failure_at = None
    if last is None and success_at is None and failure_at is None:
        return []
    framework = g.framework or (at_gateway.framework if at_gateway is not None else None) or ""
    return schema.last_run_families(ns, g.kind.value, framework, last, success_at, failure_at)
