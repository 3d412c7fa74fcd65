"""The delivery engine: record in memory on the caller's thread, push from one sender thread.

Recording appends to a bounded deque (no lock, no I/O). A daemon thread wakes
every ``interval`` seconds (or when asked to flush), folds what was recorded
into one pending payload per Pushgateway group, so any number of records for a
group between two pushes become one push, and POSTs each changed group over a
keep-alive connection. Connection errors, 5xx and 429 are retried with
exponential backoff and jitter, other 4xx are not. After ``fork()`` the child
gets a fresh, empty engine: what the parent recorded is the parent's to send.

What cannot be delivered in time (a flush that times out, the process exiting,
the in-memory queue full) goes to the durable spool (spool.py); a sender that
reaches the gateway replays the spool, never overwriting a newer value there.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric

from . import schema
from .config import Config
from .groups import GatewayError, GroupInfo, parse_groups, read_json
from .logs import log, warn_limited
from .records import FAILURE_STATUSES, SUCCESS, FlowRecord, TaskRecord
from .spool import Entry, Spool, SpoolFull
from .transport import Outcome, Transport

MIN_BACKOFF = 0.25
MAX_BACKOFF = 30.0
#: While a flush waits, a failing group is retried at least this often.
FLUSH_RETRY = 0.5
#: How often a sender that reaches the gateway looks at the spool, and how many
#: spool files one pass replays.
REPLAY_EVERY = 30.0
REPLAY_BATCH = 50
#: Records past the queue bound are written to the spool this many to a file.
OVERFLOW_BATCH = 200

_Item = tuple[int, TaskRecord | FlowRecord, tuple[tuple[str, str], ...] | None]


@dataclass
class Stats:
    """What the engine did; read with :meth:`Engine.stats`."""

    recorded: int = 0
    pushes: int = 0
    push_failures: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    rejected: int = 0  # records refused by the gateway (4xx): not retried
    dropped_queue_full: int = 0  # only when the spool could not take them either
    dropped_too_many_groups: int = 0
    dropped_spool_full: int = 0
    spooled: int = 0  # records written to the spool
    replayed: int = 0  # spooled records (of any process) this one delivered


@dataclass
class _Group:
    path: str
    kind: str  # "task" or "flow"
    key: schema.GroupKey = ()
    framework: str = ""
    # Not yet sent: the newest record, and the newest success / final-failure time.
    last: TaskRecord | FlowRecord | None = None
    success_at: float | None = None
    failure_at: float | None = None
    # The newest end times seen, so a late older record never hides a newer one.
    newest: float = float("-inf")
    newest_run: tuple[str | None, int] = (None, 0)  # run id and attempt of ``last``
    newest_success: float = float("-inf")
    newest_failure: float = float("-inf")
    cumulative: schema.Cumulative | None = None
    pending: int = 0  # records folded in since the last successful push
    failures: int = 0
    retry_at: float = 0.0
    last_try: float = 0.0

    def fold(self, rec: TaskRecord | FlowRecord) -> None:
        self.framework = rec.framework
        end = rec.end_time
        run_id, attempt = (rec.run_id, rec.attempt) if isinstance(rec, TaskRecord) else (None, 0)
        if run_id is not None and run_id == self.newest_run[0]:
            newer = attempt >= self.newest_run[1]  # a retry reported after its next try
        else:
            newer = end >= self.newest
        if newer:
            self.newest, self.last = max(end, self.newest), rec
            self.newest_run = (run_id, attempt)
        if rec.status == SUCCESS:
            if end >= self.newest_success:
                self.newest_success = self.success_at = end
        elif rec.status in FAILURE_STATUSES and end >= self.newest_failure:
            self.newest_failure = self.failure_at = end

    def families(self, ns: str) -> list[Metric]:
        fams = schema.last_run_families(
            ns, self.kind, self.framework, self.last, self.success_at, self.failure_at
        )
        if self.cumulative is not None:
            fams += self.cumulative.families(ns)
        return fams

    def sent(self) -> None:
        self.last = self.success_at = self.failure_at = None
        self.pending = self.failures = 0
        self.retry_at = 0.0

    def merge(self, e: Entry) -> None:
        """Fold a spooled state in (replay)."""
        if e.last is not None:
            self.fold(e.last)
        for at, attr, newest in (
            (e.success_at, "success_at", "newest_success"),
            (e.failure_at, "failure_at", "newest_failure"),
        ):
            if at is not None and at >= getattr(self, newest):
                setattr(self, newest, at)
                setattr(self, attr, at)
        self.pending += e.records

    def entry(self, ns: str) -> Entry:
        return Entry(
            self.kind, self.key, ns, self.last, self.success_at, self.failure_at, self.pending
        )


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        engine._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Engine:
    """One per process is the norm (see :func:`orchestrator_push.configure`)."""

    def __init__(
        self,
        config: Config,
        *,
        transport: Callable[[Config], Transport] = Transport,
    ) -> None:
        self.config = config
        self._make_transport = transport
        self._closed = False
        self._atexit_registered = False
        self._init_state()
        _engines.add(self)

    def __repr__(self) -> str:
        return f"<Engine {self.config.url} pid={self._pid}>"

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._queue: deque[_Item] = deque()
        self._seq = itertools.count(1)
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._settled_cv = threading.Condition()
        self._settled = 0  # every record with a lower sequence number is settled
        self._lost = 0  # records given up on (rejected or dropped): flush() reports them
        self._lost_seen = 0  # ... once: the value the last flush() saw
        self._flushing = 0
        self._stopping = False
        self._exit_failed_pending: int | None = None  # see flush_at_exit
        self._thread: threading.Thread | None = None
        self._groups: dict[schema.GroupKey, _Group] = {}
        self._stats = Stats()
        # Guards the groups against the exit-time spooling racing the sender.
        self._lock = threading.Lock()
        self._spool = (
            Spool(self.config.spool_dir, self.config.spool_max_bytes)
            if self.config.spool_dir
            else None
        )
        self._next_replay = 0.0
        self._replay_requested = False
        self._overflow_lock = threading.Lock()
        self._overflow_buf: list[Entry] = []  # spool entries not yet written

    def _after_fork(self) -> None:
        # Locks may have been held by a thread that does not exist here; the
        # parent still holds (and will deliver) everything recorded before.
        self._init_state()

    # -- the caller's side: O(1), no I/O, never raises -------------------------

    def record_task(self, rec: TaskRecord, *, cumulative: Mapping[str, str] | None = None) -> None:
        """Record a finished attempt. With ``cumulative``, also count it (SPEC 3.3)
        in the group whose extra grouping labels are ``cumulative``."""
        self._submit(rec, tuple(sorted(cumulative.items())) if cumulative is not None else None)

    def record_flow(self, rec: FlowRecord) -> None:
        self._submit(rec, None)

    def _submit(
        self, rec: TaskRecord | FlowRecord, cumulative: tuple[tuple[str, str], ...] | None
    ) -> None:
        try:
            if not self.config.enabled or self._closed:
                return
            if self._pid != os.getpid():  # a fork that bypassed os.fork's hooks
                self._after_fork()
            if len(self._queue) >= self.config.max_queue:
                self._overflow(rec)
                return
            self._queue.append((next(self._seq), rec, cumulative))
            if self._thread is None:
                self._start()
        except Exception:  # nothing may reach the user's task
            warn_limited("record", "orchestrator_push: could not record", level=logging.ERROR)

    def _overflow(self, rec: TaskRecord | FlowRecord) -> None:
        """The queue is full (the sender is stuck): this record goes to the spool,
        in files of OVERFLOW_BATCH records (the rest at the next flush or cycle)."""
        if self._spool is None:
            self._stats.dropped_queue_full += 1
            self._lost += 1
            warn_limited(
                "queue-full-drop",
                "orchestrator_push: %d records waiting to be sent; "
                "dropping new ones (ORCHESTRATOR_PUSH_MAX_QUEUE, no spool)",
                len(self._queue),
            )
            return
        rec = schema.clean(rec)
        key, kind = self._key(rec)
        g = _Group("", kind, key)
        g.fold(rec)
        g.pending = 1
        with self._overflow_lock:
            self._overflow_buf.append(g.entry(self.config.namespace))
            if len(self._overflow_buf) < OVERFLOW_BATCH:
                return
            batch, self._overflow_buf = self._overflow_buf, []
            # no fsync: this runs on the caller's thread
            self._write_spool(batch, durable=False)
        warn_limited(
            "queue-full",
            "orchestrator_push: %d records waiting to be sent; "
            "spooling new ones to %s (ORCHESTRATOR_PUSH_MAX_QUEUE)",
            len(self._queue),
            self._spool.directory,
        )

    def _spool_overflow(self) -> None:
        """Write what the callers' overflow left in memory."""
        if not self._overflow_buf:
            return
        with self._overflow_lock:
            batch, self._overflow_buf = self._overflow_buf, []
            if batch:
                self._write_spool(batch)

    def _write_spool(self, entries: list[Entry], durable: bool = True) -> bool:
        assert self._spool is not None
        records = sum(e.records for e in entries)
        try:
            self._spool.write(entries, durable)
        except SpoolFull:
            self._stats.dropped_spool_full += records
            self._lost += records
            warn_limited(
                "spool-full",
                "orchestrator_push: spool %s is full (ORCHESTRATOR_PUSH_SPOOL_MAX_BYTES); "
                "%d records dropped",
                self._spool.directory,
                records,
            )
            return False
        except OSError as exc:
            self._stats.dropped_spool_full += records
            self._lost += records
            warn_limited(
                "spool-error",
                "orchestrator_push: cannot write the spool %s (%s); %d records dropped",
                self._spool.directory,
                type(exc).__name__,
                records,
            )
            return False
        self._stats.spooled += records
        return True

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            t = threading.Thread(target=self._run, name="orchestrator-push", daemon=True)
            t.start()
            self._thread = t
            if not self._atexit_registered:
                self._atexit_registered = True
                atexit.register(self._at_exit)

    # -- flush and shutdown ------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything recorded so far; wait at most ``timeout`` seconds
        (default: the configured flush timeout). What is still undelivered then
        goes to the spool. True when all of it reached the gateway or the spool
        (none was dropped or refused). Never raises."""
        try:
            settled = self._flush(self.config.flush_timeout if timeout is None else timeout)
            if not settled:
                settled = self._spool_pending()
            return self._nothing_lost() and settled
        except Exception:
            warn_limited("flush", "orchestrator_push: flush failed", level=logging.ERROR)
            return False

    def _flush(self, timeout: float) -> bool:
        """Wait until everything recorded before the call is settled."""
        if self._pid != os.getpid():
            self._after_fork()
        target = next(self._seq)  # every record recorded before this call has a lower number
        if self._thread is None:
            return True
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._settled_cv:
            self._flushing += 1
        try:
            self._replay_requested = True  # a flush also offers the spool to the gateway
            self._wake.set()
            with self._settled_cv:
                while self._settled < target - 1:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._settled_cv.wait(remaining)
        finally:
            with self._settled_cv:
                self._flushing -= 1
        return True

    def _spool_pending(self) -> bool:
        """Move everything not yet delivered to the spool. True if it all went."""
        if self._spool is None:
            return False
        self._spool_overflow()
        with self._lock:
            while self._queue:
                self._fold(*self._queue.popleft())
            entries = [
                g.entry(self.config.namespace)
                for g in self._groups.values()
                if g.pending and g.kind != "cumulative"
            ]
            if not entries:
                return not any(g.pending for g in self._groups.values())
            ok = self._write_spool(entries)
            for g in self._groups.values():
                if g.pending and g.kind != "cumulative":
                    g.sent()
        if ok:
            log.warning(
                "orchestrator_push: %s unreachable; %d records spooled to %s for the next "
                "process that reaches it",
                self.config.url,
                sum(e.records for e in entries),
                self._spool.directory,
            )
        with self._settled_cv:
            self._settled_cv.notify_all()
        return ok and not any(g.pending for g in self._groups.values())

    def _nothing_lost(self) -> bool:
        """No record was dropped or refused since the previous flush."""
        lost, self._lost_seen = self._lost - self._lost_seen, self._lost
        return lost == 0

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender. Records made afterwards are ignored."""
        delivered = self.flush(timeout)
        self._closed = True
        self._stopping = True
        atexit.unregister(self._at_exit)
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(1.0)
        return delivered

    def flush_at_exit(self) -> bool:
        """The process is about to exit: flush, bounded by the flush timeout.

        Called by a framework's shutdown hook and then by ``atexit``. When a
        previous call failed and nothing was recorded since, it returns at once,
        so a gateway that is down delays the exit by one timeout, not several.
        """
        pending = self.pending()
        if self._exit_failed_pending is not None and pending <= self._exit_failed_pending:
            return False
        ok = self.flush() if self._thread is not None else True
        if ok:
            self._exit_failed_pending = None
        else:
            self._exit_failed_pending = self.pending()
            warn_limited(
                "exit",
                "orchestrator_push: exiting with %d records not delivered to %s",
                self._exit_failed_pending,
                self.config.url,
            )
        return ok

    def _at_exit(self) -> None:
        if not self._closed:
            self.flush_at_exit()

    def pending(self) -> int:
        """Records recorded but not yet delivered, spooled or given up on."""
        return (
            len(self._queue)
            + len(self._overflow_buf)
            + sum(g.pending for g in list(self._groups.values()))
        )

    def stats(self) -> Stats:
        s = self._stats
        return Stats(
            s.recorded,
            s.pushes,
            Counter(s.push_failures),
            s.retries,
            s.rejected,
            s.dropped_queue_full,
            s.dropped_too_many_groups,
            s.dropped_spool_full,
            s.spooled,
            s.replayed,
        )

    # -- the sender thread ---------------------------------------------------------

    def _run(self) -> None:
        transport = self._make_transport(self.config)
        try:
            while not self._stopping:
                self._wake.wait(self._next_wait())
                self._wake.clear()
                try:
                    self._cycle(transport)
                except Exception:  # keep the sender alive whatever happens
                    log.exception("orchestrator_push: sender cycle failed")
        finally:
            transport.close()

    def _next_wait(self) -> float:
        wait = self.config.interval
        now = time.monotonic()
        for g in list(self._groups.values()):
            if g.pending:
                wait = min(wait, max(g.retry_at - now, 0.0))
        if self._flushing:
            wait = min(wait, FLUSH_RETRY)
        return wait

    def _cycle(self, transport: Transport) -> None:
        mark = next(self._seq)
        self._spool_overflow()
        with self._lock:
            while self._queue:
                self._fold(*self._queue.popleft())
        now = time.monotonic()
        for g in list(self._groups.values()):
            if not g.pending:
                continue
            due = now >= g.retry_at or (self._flushing and now >= g.last_try + FLUSH_RETRY)
            if due:
                self._push(transport, g)
        if self._spool is not None and (self._replay_requested or now >= self._next_replay):
            self._replay_requested = False
            self._next_replay = now + (1.0 if self._replay(transport) else REPLAY_EVERY)
        if not any(g.pending for g in self._groups.values()):
            with self._settled_cv:
                self._settled = max(self._settled, mark - 1)
                self._settled_cv.notify_all()

    def _group(self, key: schema.GroupKey, kind: str) -> _Group | None:
        g = self._groups.get(key)
        if g is None:
            if len(self._groups) >= self.config.max_groups:
                self._stats.dropped_too_many_groups += 1
                self._lost += 1
                if self._stats.dropped_too_many_groups == 1:  # once: the count says the rest
                    log.warning(
                        "orchestrator_push: more than %d groups in this process "
                        "(ORCHESTRATOR_PUSH_MAX_GROUPS); dropping records for new ones "
                        "(counted in orchestrator_push_records_dropped_total"
                        '{reason="too_many_groups"}). Is a run id part of a flow or task name?',
                        self.config.max_groups,
                    )
                return None
            g = self._groups[key] = _Group(schema.group_path(key), kind, key)
        return g

    def _key(self, rec: TaskRecord | FlowRecord) -> tuple[schema.GroupKey, str]:
        job, static = self.config.job_for(rec.framework), self.config.labels
        if isinstance(rec, TaskRecord):
            return schema.task_group(job, rec, static), "task"
        return schema.flow_group(job, rec, static), "flow"

    def _fold(
        self,
        _seq: int,
        rec: TaskRecord | FlowRecord,
        cumulative: tuple[tuple[str, str], ...] | None,
    ) -> None:
        c = self.config
        job, static = c.job_for(rec.framework), c.labels
        self._stats.recorded += 1
        rec = schema.clean(rec)
        g = self._group(*self._key(rec))
        if g is not None:
            g.fold(rec)
            g.pending += 1
        if cumulative is not None and isinstance(rec, TaskRecord):
            cg = self._group((("job", job), *cumulative, *sorted(static.items())), "cumulative")
            if cg is not None:
                if cg.cumulative is None:
                    cg.cumulative = schema.Cumulative()
                cg.cumulative.add(rec)
                cg.pending += 1

    def _push(self, transport: Transport, g: _Group) -> None:
        ns = self.config.namespace
        with self._lock:
            if not g.pending:  # spooled meanwhile
                return
            body = schema.encode(g.families(ns) + self._self_families(g.framework))
        g.last_try = time.monotonic()
        outcome = transport.request("POST", g.path, body)
        if outcome.ok:
            self._stats.pushes += 1
            with self._lock:
                g.sent()
            return
        reason = _reason(outcome)
        self._stats.push_failures[reason] += 1
        if outcome.retryable:
            g.failures += 1
            self._stats.retries += 1
            backoff = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(g.failures - 1, 16))
            g.retry_at = g.last_try + backoff * random.uniform(0.5, 1.0)
            warn_limited(
                f"push-{reason}",
                "orchestrator_push: push to %s failed (%s); retrying with backoff",
                self.config.url,
                outcome.error or reason,
            )
            return
        if outcome.status in (401, 403):
            self._refused_credentials(g, outcome)
            return
        # The gateway will refuse this payload again: drop it, say why, count it.
        with self._lock:
            self._stats.rejected += g.pending
            self._lost += g.pending
            g.sent()
        warn_limited(
            f"rejected-{outcome.status}",
            "orchestrator_push: %s refused a push to %s with HTTP %d: %s",
            self.config.url,
            g.path,
            outcome.status,
            outcome.error,
        )

    def _refused_credentials(self, g: _Group, outcome: Outcome) -> None:
        """401/403: retrying with the same credentials is pointless, but the records
        are good: they wait in the spool for a process whose credentials work."""
        with self._lock:
            spooled = (
                g.kind != "cumulative"
                and self._spool is not None
                and self._write_spool([g.entry(self.config.namespace)])
            )
            if not spooled:
                self._stats.rejected += g.pending
                self._lost += g.pending
            g.sent()
        warn_limited(
            f"auth-{outcome.status}",
            "orchestrator_push: %s refused the credentials (HTTP %d); check "
            "ORCHESTRATOR_PUSH_USERNAME and ORCHESTRATOR_PUSH_PASSWORD(_FILE) or "
            "ORCHESTRATOR_PUSH_BEARER_TOKEN(_FILE). Not retried; records %s",
            self.config.url,
            outcome.status,
            "spooled" if spooled else "dropped",
            level=logging.ERROR,
        )

    def _self_families(self, framework: str) -> list[Metric]:
        s = self._stats
        return schema.self_families(
            self.config.namespace,
            framework,
            dropped={
                "queue_full": s.dropped_queue_full,
                "too_many_groups": s.dropped_too_many_groups,
                "rejected": s.rejected,
                "spool_full": s.dropped_spool_full,
            },
            failures=dict(s.push_failures),
            spooled=s.spooled,
            replayed=s.replayed,
        )

    # -- replaying the spool -------------------------------------------------------

    def replay_spool(self) -> bool:
        """Deliver the whole spool now, on the caller's thread (the ``replay``
        command). True when it is empty afterwards."""
        if self._spool is None:
            return True
        transport = self._make_transport(self.config)
        try:
            while self._replay(transport):
                pass
        finally:
            transport.close()
        return self._spool.pending() == 0

    def _replay(self, transport: Transport) -> bool:
        """One pass over the spool; True if it may hold more to replay now."""
        assert self._spool is not None
        claimed = list(self._spool.claim(REPLAY_BATCH))
        if not claimed:
            return False
        merged: dict[tuple[str, schema.GroupKey], _Group] = {}
        for _path, entries in claimed:
            for e in entries:
                g = merged.get((e.namespace, e.key))
                if g is None:
                    g = merged[(e.namespace, e.key)] = _Group(
                        schema.group_path(e.key), e.kind, e.key
                    )
                g.merge(e)
        delivered = 0  # counted once the pass ends: a released file comes back
        # A group this process still has to push takes the spooled state in: its
        # next push then carries whichever is newer (pushing the spooled value now
        # would let the older one in memory overwrite it).
        with self._lock:
            while self._queue:  # records still queued are older than the spooled overflow
                self._fold(*self._queue.popleft())
            for ns, key in list(merged):
                mine = self._groups.get(key) if ns == self.config.namespace else None
                if mine is not None and mine.pending and mine.kind == merged[(ns, key)].kind:
                    g = merged.pop((ns, key))
                    delivered += g.pending
                    mine.merge(g.entry(ns))
        current: dict[tuple[str, schema.GroupKey], GroupInfo] = {}
        if merged:
            try:
                data = read_json(transport, "/api/v1/metrics") or []
            except GatewayError:
                for path, _ in claimed:
                    self._spool.release(path)
                return False
            for ns in {ns for ns, _ in merged}:
                for info in parse_groups(data, ns):
                    if info.kind in ("task", "flow"):
                        current[(ns, tuple(sorted(info.labels.items())))] = info
        for (ns, key), g in merged.items():
            families = _newer_than(ns, g, current.get((ns, tuple(sorted(key)))))
            if not families:
                delivered += g.pending  # the gateway already knows better
                continue
            outcome = transport.request("POST", g.path, schema.encode(families))
            if outcome.ok:
                delivered += g.pending
            elif outcome.retryable:
                for path, _ in claimed:
                    self._spool.release(path)  # all of it again later; replay is idempotent
                return False
            else:
                self._stats.rejected += g.pending
                self._lost += g.pending
        for path, _ in claimed:
            self._spool.done(path)
        self._stats.replayed += delivered
        log.info("orchestrator_push: replayed %d spool files to %s", len(claimed), self.config.url)
        return len(claimed) >= REPLAY_BATCH


def _newer_than(ns: str, g: _Group, at_gateway: GroupInfo | None) -> list[Metric]:
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
    return schema.last_run_families(ns, g.kind, framework, last, success_at, failure_at)


def _reason(outcome: Outcome) -> str:
    if outcome.status == 0:
        if outcome.error.startswith("TLS"):
            return "tls"
        return "timeout" if outcome.error == "timed out" else "connection"
    return f"http_{outcome.status}"
