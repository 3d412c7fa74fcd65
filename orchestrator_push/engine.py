"""The engine: one per process, over a group table, a sender, a replayer and a ledger.

Recording folds the record into its group's state on the caller's thread,
under one short lock, with no I/O (table.py): memory grows with groups, never
with records, and a burst of any size drops and spools nothing. One daemon
thread pushes the dirty groups every ``interval`` (sender.py) and replays the
spool (replayer.py); an engine made with ``thread=False`` (``exec``'s, whose
main thread only waits for its command) has its owner do that on its own thread
(:meth:`Engine.drive`). Every loss goes through the ledger (ledger.py). After
``fork()`` the child gets a fresh, empty engine: what the parent recorded is
the parent's to send.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from functools import partial
from typing import TypeVar, cast

from . import host_counts
from .config import Config
from .host_counts import HostCounts
from .ledger import Ledger, Loss, Stats
from .logs import ERROR, WARNING, emit, warn_limited
from .records import FlowRecord, TaskRecord
from .replayer import Replayer
from .schema import GroupKey, GroupKind, Running
from .sender import Sender
from .spool import Entry, Spool, SpoolFull
from .table import DEFAULT_TTL, Node, Snapshot, Table
from .transport import Transport, connect

#: How often a sender that reaches the gateway looks at the spool.
REPLAY_EVERY = 30.0
#: How long a sender cycle waits for the host count store's lock (the next cycle tries again).
HOST_LOCK_WAIT = 0.2

_INF = float("inf")
_R = TypeVar("_R", bound=TaskRecord | FlowRecord)

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        engine._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _key(labels: Mapping[str, str] | tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A counters group's extra grouping labels as the table indexes them."""
    return labels if isinstance(labels, tuple) else tuple(labels.items())


class Engine:
    """One per process is the norm (see :func:`orchestrator_push.configure`)."""

    def __init__(
        self,
        config: Config,
        *,
        transport: Callable[[Config], Transport] = connect,
        thread: bool = True,
    ) -> None:
        self.config = config
        self._make_transport = transport
        self._driven = not thread  # the owner calls drive(): no thread of ours
        self._closed = False
        self._init_state()
        _engines.add(self)
        # Registered now, not when the sender starts: handlers registered later
        # (a framework's, the user's) run first, so what they record is flushed.
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return f"<Engine {self.config.url} pid={self._pid}>"

    def _init_state(self) -> None:
        c = self.config
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._table = Table(c.job, c.labels, c.max_groups, c.group_ttl, c.buckets)
        self._ledger = Ledger()
        self._spool = Spool(c.spool_dir, c.spool_max_bytes) if c.spool_dir else None
        self._replayer = (
            Replayer(c, self._spool, self._ledger, self._absorb, stop=self._stopping)
            if self._spool is not None
            else None
        )
        self._sender = Sender(
            c, self._table, self._lock, self._ledger, self._keep, self._after_cycle
        )
        self._started = False
        self._synchronous = False  # no thread: deliver on the caller's
        self._here_lock = threading.Lock()  # the caller's transport, and its cycles
        self._here_transport: Transport | None = None
        self._exiting = False  # the interpreter is exiting: no more replays, deliver at once
        # started, not synchronous, not exiting: a start needs nothing but its fold
        self._steady = False
        self._holding_replays = 0  # exit flushes in progress: they start no replay
        self._replaying = False
        self._next_replay = 0.0
        self._replay_requested = False
        self._replays = 0  # replay passes done (flush() waits for one)
        self._warned_cap = False
        self._credentials_refused = False
        self._exit_failed_pending: int | None = None  # see flush_at_exit
        self._hosts: dict[str, HostCounts] = {}  # by job

    def _stopping(self) -> bool:
        return self._sender.stopping

    def _after_fork(self) -> None:
        # Locks may have been held by a thread that does not exist here; the
        # parent still holds (and will deliver) everything recorded before.
        self._init_state()

    # -- the caller's side: a lookup and a fold under one lock, never raises -------

    def record_task(
        self,
        rec: TaskRecord,
        *,
        cumulative: Mapping[str, str] | tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        """Record a finished attempt. With ``cumulative`` (a mapping, or a tuple of
        (name, value) pairs, which costs less), also count it in the counters
        group whose extra grouping labels are ``cumulative`` (a long-lived
        process that sees every attempt: a Celery node); see also :meth:`count`."""
        try:
            admitted = self._admit(rec)
            if admitted is None:
                return
            counters = None if cumulative is None else _key(cumulative)
            with self._lock:
                ok = self._table.fold_task(admitted, counters)
                self._ledger.recorded()
            self._after_record(ok)
        except Exception:  # nothing may reach the user's task
            warn_limited("record", "orchestrator_push: could not record", level=ERROR)

    def count(self, rec: TaskRecord | FlowRecord) -> None:
        """Count a finished attempt or flow run in the host's store (host_counts.py),
        where the counts of every process of this host and user add up: pushed
        after each sender cycle and at :meth:`flush`. Not a record: its last-run
        group is :meth:`record_task`'s / :meth:`record_flow`'s. Without a spool
        directory there is no store and nothing is counted. Never raises."""
        try:
            if not self.config.spool_dir:
                return
            admitted = self._admit(rec)
            if admitted is not None:
                self._host_counts(admitted.framework).add(admitted)
                if not self._started:
                    self._start()
        except Exception:
            warn_limited("count", "orchestrator_push: could not count", level=ERROR)

    def record_flow(self, rec: FlowRecord) -> None:
        """Record a finished flow run."""
        try:
            admitted = self._admit(rec)
            if admitted is None:
                return
            with self._lock:
                ok = self._table.fold_flow(admitted)
                self._ledger.recorded()
            self._after_record(ok)
        except Exception:
            warn_limited("record", "orchestrator_push: could not record", level=ERROR)

    def record_start(
        self,
        framework: str,
        flow: str,
        task: str | None = None,
        *,
        at: float | None = None,
        timeout: float | None = None,
        waited: float | None = None,
    ) -> None:
        """An attempt of ``task`` (or a run of ``flow`` when ``task`` is None)
        started (``at``, default now; ``timeout``: its time limit in seconds, if
        the framework sets one; ``waited``: how long a task waited to start after
        it was ready, or how late a flow run started after its schedule). Pushed
        within one interval, while it runs; a start and end within one interval
        share one push. Never raises."""
        try:
            if not self.config.enabled or self._closed:
                return
            start = time.time() if at is None else float(at)
            if start - start != 0.0:
                return
            # Every Celery attempt comes here (bench/bench_start.py): no getpid()
            # system call and no ``with`` (each costs more than the fold). A fork
            # that bypassed os.fork's hooks is caught where it matters, on a lock
            # the parent held; otherwise the start lands in the inherited table,
            # which the end's own fork check (_admit) discards: a start is not a record.
            lock = self._lock
            if not lock.acquire(False):
                if self._pid != os.getpid():
                    self._after_fork()
                    lock = self._lock
                lock.acquire()
            try:
                ok = self._table.start(framework, flow, task, start, timeout, waited)
            finally:
                lock.release()
            if not ok or not self._steady:
                self._after_record(ok)  # the uncommon cases, out of the common path
        except Exception:
            warn_limited("start", "orchestrator_push: could not record a start")

    def record_schedule(
        self,
        framework: str,
        flow: str,
        task: str | None = None,
        *,
        next_run: float | Mapping[str, float] | None,
        grace: float,
        interval: float | None = None,
        delay: float | None = None,
    ) -> None:
        """The next scheduled run of ``task`` (or of ``flow`` when ``task`` is
        None) is due at ``next_run`` (unix time), or, given a mapping, each
        schedule entry's (Celery beat: entry name -> due time); it may start up
        to ``grace`` seconds late. None: it is not scheduled now (paused,
        removed) and its schedule series are removed from the gateway.
        ``interval``, the schedule's period, keeps the group alive for a few of
        them (``orchestrator_push_group_ttl_seconds``); ``delay``: how late the
        run starting now started after its tick. Pushed within one interval;
        call it when the schedule changes, not on every run. Never raises."""
        try:
            if not self.config.enabled or self._closed:
                return
            with self._lock:
                ok = self._table.schedule(framework, flow, task, next_run, grace, interval, delay)
            self._after_record(ok)
        except Exception:
            warn_limited("schedule", "orchestrator_push: could not record a schedule")

    def register_node(
        self,
        counters: Mapping[str, str] | tuple[tuple[str, str], ...],
        framework: str,
        role: str,
        running: Callable[[], Running] | None = None,
    ) -> None:
        """This long-lived process pushes, with its counters group ``counters``,
        ``worker_up`` 1 and ``worker_last_seen_timestamp_seconds`` every push
        interval until :meth:`node_down`; with ``running``, also what it says is
        in progress (called on the sender's thread at each push; it must not
        block). Never raises."""
        try:
            if not self.config.enabled or self._closed:
                return
            with self._lock:
                ok = self._table.node(framework, _key(counters), Node(role, running), time.time())
            self._after_record(ok)
        except Exception:
            warn_limited("node", "orchestrator_push: could not register the node", level=ERROR)

    def node_down(
        self, counters: Mapping[str, str] | tuple[tuple[str, str], ...], framework: str
    ) -> None:
        """A clean shutdown: the node's next push says ``worker_up`` 0 (flush to send it)."""
        try:
            with self._lock:
                self._table.node_down(framework, _key(counters), time.time())
        except Exception:
            warn_limited("node", "orchestrator_push: could not mark the node down", level=ERROR)

    def _admit(self, rec: _R) -> _R | None:
        """The record to fold (cleaned if need be), or None: disabled, closed, refused."""
        if not self.config.enabled or self._closed:
            return None
        if self._pid != os.getpid():  # a fork that bypassed os.fork's hooks
            self._after_fork()
        d, e = rec.duration, rec.end_time
        if not (0.0 <= d < _INF) or e - e != 0.0:
            return self._clean(rec)
        return rec

    def _after_record(self, ok: bool) -> None:
        if not ok:
            self._too_many_groups()
        if not self._started:
            self._start()
        if self._exiting or (self._synchronous and not self._driven):
            # past the exit flush, or no thread and no owner driving: nobody else will
            self._flush(self.config.flush_timeout, False)

    def _clean(self, rec: _R) -> _R | None:
        """A record with a non-finite end time is refused; a negative or
        non-finite duration is sent as 0. Both counted, both warned about."""
        e = rec.end_time
        if e - e != 0.0:
            self._ledger.lose(Loss.INVALID)
            warn_limited(
                "invalid-end",
                "orchestrator_push: a record of %s with end time %r was refused "
                "(counted as lost, reason invalid)",
                rec.flow,
                e,
            )
            return None
        self._ledger.cleaned()
        warn_limited(
            "invalid-duration",
            "orchestrator_push: a record of %s had duration %r; sent as 0",
            rec.flow,
            rec.duration,
        )
        return cast("_R", rec._replace(duration=0.0))  # a NamedTuple's _replace keeps its type

    def _too_many_groups(self) -> None:
        self._ledger.lose(Loss.TOO_MANY_GROUPS)
        if not self._warned_cap:  # once: the pushed count says the rest
            self._warned_cap = True
            emit(
                WARNING,
                "orchestrator_push: more than %d groups in this process, none of them "
                "delivered yet (ORCHESTRATOR_PUSH_MAX_GROUPS); dropping records for new ones "
                "(counted in orchestrator_push_records_dropped_total"
                '{reason="too_many_groups"}). Is a run id part of a flow or task name?',
                self.config.max_groups,
            )

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
            if self._driven:
                self._synchronous = True
                return
            try:
                self._sender.start(self._make_transport)
            except RuntimeError:  # interpreter shutdown (Python 3.12+): no new threads
                self._synchronous = self._exiting = True
            else:
                self._steady = not self._exiting

    def start(self) -> None:
        """Start the sender now rather than at the first record, so the spool of
        earlier processes is replayed while this one works."""
        if self.config.enabled and not self._closed:
            self._start()

    def drive(self) -> float | None:
        """For an engine made with ``thread=False``: do on the caller's thread
        what the sender's thread does, when it is due (at the first call, the
        spool of earlier processes; then the dirty groups each interval). The
        seconds until the next call is due (an earlier one is harmless); None
        when no call is needed (a threaded, closed or disabled engine). Never
        raises."""
        if not self._driven or self._closed or not self.config.enabled:
            return None
        try:
            if not self._started:
                self._start()
            with self._here_lock:
                return self._sender.drive(self._here())
        except Exception:  # as the thread: the next call tries again
            warn_limited("cycle", "orchestrator_push: sender cycle failed", level=ERROR)
            return self.config.interval

    def _here(self) -> Transport:
        """The caller's transport (no thread), made at the first use; under _here_lock."""
        if self._here_transport is None:
            self._here_transport = self._make_transport(self.config)
        return self._here_transport

    # -- flush and shutdown ------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything recorded so far, waiting at most ``timeout`` seconds
        (default: the configured flush timeout); what is still undelivered then
        goes to the spool. Also offers the spool of earlier processes to the
        gateway, within the same time. True when everything recorded so far
        reached the gateway or the spool and nothing was given up on since the
        previous flush. Never raises."""
        return self._flush(self.config.flush_timeout if timeout is None else timeout, True)

    def _flush(self, timeout: float, replay: bool) -> bool:
        try:
            if self._pid != os.getpid():
                self._after_fork()
            deadline = time.monotonic() + max(timeout, 0.0)
            with self._lock:
                target = self._table.seq
            counts = partial(self._deliver_host_counts, deadline, exiting=not replay)
            if self._synchronous:
                settled = self._deliver_here(target, deadline, replay=replay)
            elif not self._started:
                settled = True
                counts()
            else:
                settled = self._wait(target, deadline, replay, counts)
            if not settled:
                settled = self._spool_pending()
            return self._ledger.lost_since_last_look() == 0 and settled
        except Exception:
            warn_limited("flush", "orchestrator_push: flush failed", level=ERROR)
            return False

    def _host_counts(self, framework: str) -> HostCounts:
        job = self.config.job or framework
        with self._lock:
            h = self._hosts.get(job)
            if h is None:
                h = self._hosts[job] = HostCounts(
                    self.config.spool_dir or "",
                    host_counts.group_key(job, self.config.labels),
                    framework,
                    self.config.group_ttl or DEFAULT_TTL,
                    self.config.buckets,
                )
            return h

    def _deliver_host_counts(
        self,
        deadline: float,
        *,
        exiting: bool,
        transport: Transport | None = None,
        wait: bool = True,
    ) -> None:
        """Counts for the host's store: after each sender cycle (a long-lived
        process, on the sender's transport) and at every flush, on the caller's
        thread (a short-lived process's at its exit). Not delivered (the gateway
        down, the store busy) means kept: in memory, in the store, or (exiting)
        in a pending file. Without ``wait`` (the sender's), a delivery in
        progress (a flush's, which takes what there is) is not waited for: the
        sender's pushes are not delayed by it. Never raises."""
        with self._lock:
            hosts = list(self._hosts.values())  # a delivery in flight may put some back
        if not hosts or not self.config.enabled:
            return
        # Made at the first push only: usually nothing was counted since the
        # last delivery, and over TLS a transport costs a context (the CA bundle read).
        own: list[Transport] = []

        def connect() -> Transport:
            if transport is not None:
                return transport
            if not own:
                own.append(self._make_transport(self.config))
            return own[0]

        try:
            for h in hosts:
                h.deliver(
                    connect,
                    self.config.namespace,
                    deadline,
                    self._ledger,
                    exiting=exiting,
                    wait=wait,
                )
        except Exception:  # a bug here must not cost a flush its wait or its spool
            msg = "orchestrator_push: counting this host's runs failed"
            warn_limited("host-counts-error", msg, level=ERROR)
        finally:
            for t in own:
                t.close()

    def _wait(self, target: int, deadline: float, replay: bool, counts: Callable[[], None]) -> bool:
        """Wake the sender and wait until it has settled ``target``; ``counts``
        (the host's counts) are delivered on this thread while the sender
        pushes: an ``exec`` makes both pushes at once, not one after the other."""
        s = self._sender
        with s.settled_cv:
            s.flushing += 1
            replays = self._replays
        try:
            if replay:
                self._replay_requested = True
            s.wake()
            counts()
            settled = s.wait_settled(target, deadline)
            if settled and replay and self._replayer is not None:
                with s.settled_cv:  # one replay pass, within the same time
                    while self._replays <= replays and s.alive():
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or not s.settled_cv.wait(remaining):
                            break
                with self._lock:
                    absorbed = self._table.seq
                s.wait_settled(absorbed, deadline)
            return settled
        finally:
            with s.settled_cv:
                s.flushing -= 1

    def _deliver_here(self, target: int, deadline: float, *, replay: bool) -> bool:
        """No thread (none wanted, or none can start at interpreter shutdown):
        push on the caller's thread, retrying until the deadline, then the
        host's counts, one after the other on one connection. With ``replay``
        and time left, the spool is offered too; otherwise no replay pass
        starts: here it would hold the caller (a ``close(0)``) past the deadline."""
        s = self._sender
        hold = not replay or time.monotonic() >= deadline
        with self._here_lock:
            transport = self._here()
            with s.settled_cv:
                s.flushing += 1  # failed groups retried each FLUSH_RETRY, not after backoff
                self._holding_replays += hold
                self._replay_requested = self._replay_requested or not hold
            try:
                while True:
                    s.cycle(transport)
                    settled = s.settled >= target
                    if settled or time.monotonic() >= deadline:
                        break
                    time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))
            finally:
                with s.settled_cv:
                    s.flushing -= 1
                    self._holding_replays -= hold
            self._deliver_host_counts(deadline, exiting=not replay, transport=transport)
            return settled

    def _spool_pending(self) -> bool:
        """Move everything not yet delivered to the spool. True if it all went."""
        if self._spool is None:
            return False
        ns = self.config.namespace
        with self._lock:
            snaps = [
                self._table.snapshot(g, ns)
                for g in self._table.dirty()
                if g.kind is not GroupKind.COUNTERS
            ]
            # a start is not spooled: the end, which carries the outcome, is
            keep = [s for s in snaps if s.pending]
            ok = self._write_spool(keep) if keep else True
            for snap in snaps:
                self._table.commit(snap)
            left = self._table.pending()
        if keep and ok:
            emit(
                WARNING,
                "orchestrator_push: %s unreachable; %d records spooled to %s for the next "
                "process that reaches it",
                self.config.url,
                sum(s.pending for s in keep),
                self._spool.directory,
            )
        self._sender.notify_settled()
        return ok and left == 0

    def _keep(self, snaps: list[Snapshot]) -> bool:
        """Refused credentials: the records wait in the spool for a process whose
        credentials work (counters cannot be spooled: False)."""
        self._credentials_refused = True  # replaying with them would be refused too
        if self._spool is None or any(s.group.kind is GroupKind.COUNTERS for s in snaps):
            return False
        return self._write_spool(snaps)

    def _write_spool(self, snaps: list[Snapshot]) -> bool:
        """Write, count and warn; True if written. Losses go to the ledger."""
        assert self._spool is not None
        ns = self.config.namespace
        entries = [s.entry(ns) for s in snaps]
        records = sum(e.records for e in entries)
        try:
            self._spool.write(entries)
        except SpoolFull:
            self._ledger.lose(Loss.SPOOL_FULL, records)
            warn_limited(
                "spool-full",
                "orchestrator_push: spool %s is full (ORCHESTRATOR_PUSH_SPOOL_MAX_BYTES); "
                "%d records dropped",
                self._spool.directory,
                records,
            )
            return False
        except OSError as exc:
            self._ledger.lose(Loss.SPOOL_ERROR, records)
            warn_limited(
                "spool-error",
                "orchestrator_push: cannot write the spool %s (%s); %d records dropped",
                self._spool.directory,
                type(exc).__name__,
                records,
            )
            return False
        self._ledger.spooled(records)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender. Records made afterwards are ignored."""
        delivered = self.flush(timeout)
        self._closed = True
        self._sender.stopping = True
        atexit.unregister(self._at_exit)
        self._sender.wake()
        t = self._sender.thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(1.0)
        with self._here_lock:
            here, self._here_transport = self._here_transport, None
        if here is not None:
            here.close()
        return delivered

    def flush_at_exit(self) -> bool:
        """The process is about to exit: deliver its own records, bounded by the
        flush timeout; no spool replay is started (other processes' files must
        not delay this exit), one already running is let finish within it.

        Called by a framework's shutdown hook and then by ``atexit``. When a
        previous call failed and nothing was recorded since, it returns at once,
        so a gateway that is down delays the exit by one timeout, not several.
        """
        pending = self.pending()
        if self._exit_failed_pending is not None and pending <= self._exit_failed_pending:
            return False
        deadline = time.monotonic() + self.config.flush_timeout
        with self._sender.settled_cv:
            self._holding_replays += 1
        try:
            ok = self._flush(self.config.flush_timeout, False)
            self._wait_for_replay(deadline)
        finally:
            with self._sender.settled_cv:
                self._holding_replays -= 1
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

    def _wait_for_replay(self, deadline: float) -> None:
        """A replay pass already running is let finish (claimed files cut off
        half-way would be replayed again by someone else), within the deadline."""
        cv = self._sender.settled_cv
        with cv:
            while self._replaying and self._sender.alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not cv.wait(remaining):
                    return

    def _at_exit(self) -> None:
        if not self._closed and self._pid == os.getpid():
            self._exiting = True
            self._steady = False
            self.flush_at_exit()

    def pending(self) -> int:
        """Records recorded but not yet delivered, spooled or given up on."""
        with self._lock:
            return self._table.pending()

    def stats(self) -> Stats:
        return self._ledger.snapshot()

    @property
    def ledger(self) -> Ledger:
        """Where adapters count what they lose before it reaches the engine."""
        return self._ledger

    # -- the spool ------------------------------------------------------------------

    def _after_cycle(self, transport: Transport) -> None:
        transport.catch_up()
        if not self._exiting:
            self._deliver_host_counts(
                time.monotonic() + HOST_LOCK_WAIT, exiting=False, transport=transport, wait=False
            )
        self._replay(transport)

    def _replay(self, transport: Transport) -> None:
        """After each sender cycle: one replay pass when one is due."""
        if self._replayer is None or self._exiting or self._credentials_refused:
            return
        now = time.monotonic()
        with self._sender.settled_cv:
            if self._holding_replays or not (self._replay_requested or now >= self._next_replay):
                return
            self._replay_requested = False
            self._replaying = True
        try:
            result = self._replayer.run_pass(transport)
        finally:
            with self._sender.settled_cv:
                self._replaying = False
                self._sender.settled_cv.notify_all()
        self._next_replay = now + (1.0 if result.more else REPLAY_EVERY)
        if result.files and not result.failed:
            self._sender.wake()  # absorbed states are pushed at once
        with self._sender.settled_cv:
            self._replays += 1
            self._sender.settled_cv.notify_all()

    def _absorb(self, ns: str, kind: GroupKind, key: GroupKey, e: Entry) -> bool:
        if ns != self.config.namespace:
            return False
        with self._lock:
            return self._table.absorb(kind, key, e)
