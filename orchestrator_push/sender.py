"""The sender: one thread that pushes every dirty group, with backoff, and the
policy for each kind of answer.

Each cycle takes a snapshot of the dirty groups under the engine's lock, then
encodes and POSTs them with no lock held, then commits under the lock what
each successful push carried (:meth:`Table.commit`). The same cycle can run on
the caller's thread (:meth:`Sender.cycle`) when no thread can be started
(interpreter shutdown).
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Callable

from prometheus_client.metrics_core import Metric

from . import schema
from .config import Config
from .ledger import Ledger, Loss, Stats
from .logs import ERROR, warn_limited
from .preimport import before_threads
from .schema import GroupKind
from .table import Group, Snapshot, Table
from .transport import Outcome, Transport

MIN_BACKOFF = 0.25
MAX_BACKOFF = 30.0
#: While a flush waits, a failing group is retried at least this often.
FLUSH_RETRY = 0.5
#: Self-pacing: a cycle whose pushes took this share of the current interval
#: (and at least SLOW_FLOOR seconds), or met a retryable failure, doubles the
#: interval; one that took less than half of that halves it, back towards the
#: configured one. The gap between the two keeps a steady load at one interval.
SLOW_SHARE = 0.5
SLOW_FLOOR = 0.1
#: The paced interval never exceeds this (nor the configured one if that is
#: longer): a node's liveness still arrives well within OrchestratorWorkerDown's
#: 2 minutes.
MAX_PACED_INTERVAL = 30.0


class Action(enum.Enum):
    DONE = "done"  # delivered
    RETRY = "retry"  # no answer, 5xx, 429: try again later, keep the records
    KEEP = "keep"  # 401/403: these credentials will not do; the records wait in the spool
    REJECT = "reject"  # another 4xx: this payload will be refused again; give it up


def policy(outcome: Outcome) -> Action:
    """What to do with the records a request carried, given its answer."""
    if outcome.ok:
        return Action.DONE
    if outcome.retryable:
        return Action.RETRY
    if outcome.status in (401, 403):
        return Action.KEEP
    return Action.REJECT


def self_families(ns: str, framework: str, stats: Stats, interval: float) -> list[Metric]:
    return schema.self_families(
        ns,
        framework,
        dropped={reason.value: stats.lost[reason.value] for reason in Loss},
        failures=dict(stats.push_failures),
        spooled=stats.spooled,
        replayed=stats.replayed,
        interval=interval,
    )


def paced(interval: float, base: float, spent: float, congested: bool) -> float:
    """The next push interval, given the current one, the configured one
    (``base``), the seconds the last cycle's pushes took and whether one of
    them met a retryable failure: an overloaded gateway gets fewer pushes (its
    values grow staler) instead of a storm of retries."""
    slow = max(interval * SLOW_SHARE, SLOW_FLOOR)
    if congested or spent >= slow:
        return min(max(base, MAX_PACED_INTERVAL), interval * 2)
    if spent < slow / 2:
        return max(base, interval / 2)
    return interval


class Sender:
    """Pushes a :class:`Table`'s dirty groups. ``lock`` guards the table;
    ``keep(snapshots)`` hands the records of refused credentials to the spool
    (True if it took them); ``after_cycle(transport)`` runs once the table's own
    groups are settled (the spool's replay)."""

    def __init__(
        self,
        config: Config,
        table: Table,
        lock: threading.Lock,
        ledger: Ledger,
        keep: Callable[[list[Snapshot]], bool],
        after_cycle: Callable[[Transport], None],
    ) -> None:
        self._config = config
        self._table = table
        self._lock = lock
        self._ledger = ledger
        self._keep = keep
        self._after_cycle = after_cycle
        self._retry_at: dict[Group, tuple[int, float]] = {}  # failures so far, next try
        self._last_try: dict[Group, float] = {}
        self._cycle_lock = threading.Lock()  # the thread's cycle and a synchronous one
        self._wake = threading.Event()
        self.settled_cv = threading.Condition()
        self.settled = 0
        self.flushing = 0
        self.stopping = False
        self.thread: threading.Thread | None = None
        self._next_beat = 0.0
        self._drive_at: float | None = None  # driven (no thread): the next step's time
        #: The push interval now: the configured one, stretched while the gateway is slow.
        self.interval = config.interval

    def wake(self) -> None:
        self._wake.set()

    def start(self, make_transport: Callable[[Config], Transport]) -> None:
        """Start the thread (raises RuntimeError when none can start)."""
        before_threads()
        t = threading.Thread(
            target=self._run, args=(make_transport,), name="orchestrator-push", daemon=True
        )
        t.start()
        self.thread = t

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _run(self, make_transport: Callable[[Config], Transport]) -> None:
        transport = make_transport(self._config)
        try:
            self._begin(transport)
            while not self.stopping:
                self._wake.wait(self._next_wait())
                self._wake.clear()
                try:
                    self.cycle(transport)
                except Exception:  # keep the sender alive whatever happens
                    warn_limited("cycle", "orchestrator_push: sender cycle failed", level=ERROR)
        finally:
            transport.close()

    def _begin(self, transport: Transport) -> None:
        with self._cycle_lock:  # at start: the spool of earlier processes, meanwhile
            if not self.stopping:
                self._after_cycle(transport)

    def drive(self, transport: Transport) -> float:
        """The thread's loop one step at a time, on the caller's thread (an
        engine without a thread): a step when one is due. The seconds until the
        next is due."""
        now = time.monotonic()
        if self._drive_at is None:
            self._begin(transport)
        elif now >= self._drive_at:
            self.cycle(transport)
        else:
            return self._drive_at - now
        wait = self._next_wait()
        self._drive_at = time.monotonic() + wait
        return wait

    def _next_wait(self) -> float:
        wait = self.interval
        now = time.monotonic()
        for g, (_failures, at) in list(self._retry_at.items()):
            if g.pending:
                wait = min(wait, max(at - now, 0.0))
        if self.flushing:
            wait = min(wait, FLUSH_RETRY)
        return wait

    def cycle(self, transport: Transport) -> None:
        with self._cycle_lock:
            self._push_dirty(transport)
            self.notify_settled()
            if not self.stopping:
                self._after_cycle(transport)

    def notify_settled(self) -> None:
        with self._lock:
            settled = self._table.settled()
        with self.settled_cv:
            self.settled = max(self.settled, settled)
            self.settled_cv.notify_all()

    def _push_dirty(self, transport: Transport) -> None:
        ns = self._config.namespace
        now = time.monotonic()
        with self._lock:
            if now >= self._next_beat:  # long-lived processes say they are alive
                self._next_beat = now + self.interval
                self._table.beat(time.time())
            due = [g for g in self._table.dirty() if self._due(g, now)]
            snaps = [self._table.snapshot(g, ns) for g in due]
        for g in [g for g in self._retry_at if not g.pending]:  # spooled meanwhile
            self._retry_at.pop(g, None)
            self._last_try.pop(g, None)
        stats = self._ledger.snapshot()
        own: dict[str, list[Metric]] = {}
        spent, congested = 0.0, False
        for snap in snaps:
            fw = snap.group.framework
            if fw not in own:
                own[fw] = self_families(ns, fw, stats, self.interval)
            body = schema.encode(snap.families + own[fw])
            self._last_try[snap.group] = t0 = time.monotonic()
            # A counters group carries its whole state, so PUT also removes series
            # that ended (the oldest start of a task no longer in progress).
            method = "PUT" if snap.group.kind is GroupKind.COUNTERS else "POST"
            outcome = transport.request(method, snap.group.path, body)
            if outcome.ok and snap.schedule is not None and snap.schedule[0] is None:
                removal = schema.removal(ns, snap.group.kind.value)
                outcome = transport.request("POST", snap.group.path, removal, schema.PROTOBUF)
            spent += time.monotonic() - t0
            congested = congested or outcome.retryable
            self._settle(snap, outcome)
        if snaps and not self.flushing:
            self._pace(spent, congested)

    def _pace(self, spent: float, congested: bool) -> None:
        before = self.interval
        self.interval = paced(before, self._config.interval, spent, congested)
        if self.interval > before and before == self._config.interval:
            warn_limited(
                "paced",
                "orchestrator_push: pushes to %s are slow or failing; pushing less often "
                "(every %.3g s, at most %.3g s) until they are not",
                self._config.url,
                self.interval,
                max(self._config.interval, MAX_PACED_INTERVAL),
            )

    def _due(self, g: Group, now: float) -> bool:
        backoff = self._retry_at.get(g)
        if backoff is None or now >= backoff[1]:
            return True
        return bool(self.flushing) and now >= self._last_try.get(g, 0.0) + FLUSH_RETRY

    def _settle(self, snap: Snapshot, outcome: Outcome) -> None:
        g = snap.group
        action = policy(outcome)
        if action is Action.DONE:
            self._ledger.pushed()
            self._retry_at.pop(g, None)
            self._last_try.pop(g, None)
            with self._lock:
                self._table.commit(snap)
            return
        self._ledger.push_failed(outcome.label, retried=action is Action.RETRY)
        if action is Action.RETRY:
            failures = self._retry_at.get(g, (0, 0.0))[0] + 1
            backoff = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(failures - 1, 16))
            self._retry_at[g] = (failures, time.monotonic() + backoff * random.uniform(0.5, 1.0))
            warn_limited(
                f"push-{outcome.label}",
                "orchestrator_push: push to %s failed (%s); retrying with backoff",
                self._config.url,
                outcome.error or outcome.label,
            )
            return
        self._retry_at.pop(g, None)
        self._last_try.pop(g, None)
        if action is Action.KEEP:
            kept = self._keep([snap])
            warn_limited(
                f"auth-{outcome.status}",
                "orchestrator_push: %s refused the credentials (HTTP %d); check "
                "ORCHESTRATOR_PUSH_USERNAME and ORCHESTRATOR_PUSH_PASSWORD(_FILE) or "
                "ORCHESTRATOR_PUSH_BEARER_TOKEN(_FILE). Not retried; records %s",
                self._config.url,
                outcome.status,
                "spooled" if kept else "dropped",
                level=ERROR,
            )
            if kept:
                with self._lock:
                    self._table.commit(snap)
                return
        else:
            warn_limited(
                f"rejected-{outcome.status}",
                "orchestrator_push: %s refused a push to %s with HTTP %d: %s",
                self._config.url,
                g.path,
                outcome.status,
                outcome.error,
            )
        self._ledger.lose(Loss.REJECTED, snap.pending)
        with self._lock:
            self._table.commit(snap)

    def wait_settled(self, target: int, deadline: float) -> bool:
        """Wait until every fold numbered ``target`` or lower is committed."""
        with self.settled_cv:
            while self.settled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive():
                    return False
                self.settled_cv.wait(remaining)
        return True
