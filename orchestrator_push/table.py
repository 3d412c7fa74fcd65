"""The group table: every record folded into the state of its Pushgateway group.

Pure data: no threads, no I/O, no clock (a node's ``running`` callback is the
framework's state, read at each push). The engine calls it under one lock
(recording on the caller's thread, snapshots and commits on the sender's), so
memory is bounded by the number of groups, never by the number of records.

A group keeps what its next push must carry: the newest record, the newest
success and final-failure times, and (counters groups) cumulative counts. Every
fold gets a sequence number; a :class:`Snapshot` remembers the last one it
saw, and :meth:`Table.commit` clears only what the snapshot sent, so a record
folded in while that push was in flight stays pending.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from prometheus_client.metrics_core import Metric

from . import schema
from .config import DEFAULT_BUCKETS
from .logs import warn_limited
from .records import FAILURE_STATUSES, SUCCESS, FlowRecord, TaskRecord
from .schema import GroupKey, GroupKind
from .spool import Entry

Record = TaskRecord | FlowRecord

_NEVER = float("-inf")

#: How many task names a worker's ``tasks_running`` keeps sending as 0 once seen.
MAX_KNOWN_TASKS = 1000

#: A group's expiry when neither the configuration nor a schedule says (7 days).
DEFAULT_TTL = 7 * 86400.0
#: A scheduled group lives at least this many of its schedule's intervals.
TTL_INTERVALS = 3

#: What a group's next push says of its schedule: when the next run (or, by
#: entry name, each one) is due, None when it has none now (paused: its series
#: is removed); the grace; and how late this run started (None: not known).
#: None: nothing.
Schedule = tuple[float | Mapping[str, float] | None, float, float | None] | None


class Node:
    """A long-lived process that pushes its liveness in its counters group.

    ``running`` (called at each push, under the engine's lock: it must be a few
    reads of the framework's own state) says what is in progress.
    """

    __slots__ = ("known", "last_running", "last_seen", "role", "running", "up")

    def __init__(self, role: str, running: Callable[[], schema.Running] | None = None) -> None:
        self.role = role
        self.running = running
        self.up = True
        self.last_seen = 0.0
        #: the (flow, task) names seen in progress here (at most MAX_KNOWN_TASKS)
        self.known: dict[tuple[str, str], None] = {}
        self.last_running: schema.Running | None = None

    def sample(self) -> schema.Running | None:
        """What ``running`` says now; the previous answer if it fails."""
        if self.running is None:
            return None
        try:
            self.last_running = self.running()
        except Exception:
            warn_limited("running", "orchestrator_push: could not read the tasks in progress")
        return self.last_running

    def families(
        self, ns: str, framework: str, ran: Iterable[tuple[str, str]] = ()
    ) -> list[Metric]:
        """``ran``: the (flow, task) names that finished here (sent as 0 when
        none is in progress)."""
        running = self.sample()
        if running is not None:
            for name in running:
                if name not in self.known and len(self.known) < MAX_KNOWN_TASKS:
                    self.known[name] = None
        return schema.worker_families(
            ns,
            framework,
            self.role,
            up=self.up,
            last_seen=self.last_seen,
            running=running,
            known=[*self.known, *ran],
        )


class Group:
    """One Pushgateway group's state."""

    __slots__ = (
        "aliases",
        "counts",
        "failure_at",
        "first_pending",
        "framework",
        "key",
        "kind",
        "last",
        "newest",
        "newest_failure",
        "newest_run",
        "newest_start",
        "newest_success",
        "node",
        "path",
        "pending",
        "schedule",
        "seq",
        "started",
        "success_at",
        "timeout",
        "ttl",
        "waited",
    )

    def __init__(
        self,
        kind: GroupKind,
        key: GroupKey,
        framework: str,
        ttl: float = DEFAULT_TTL,
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        """``buckets``: the duration histograms' bounds of a counters group."""
        self.kind = kind
        self.key = key
        self.path = schema.group_path(key)
        self.framework = framework
        self.aliases: list[tuple[object, ...]] = []  # the table's index keys for this group
        # Not yet sent: the newest record, the newest success / final-failure time.
        self.last: Record | None = None
        self.success_at: float | None = None
        self.failure_at: float | None = None
        # The newest seen, sent or not, so a late older record never hides a newer one.
        self.newest = _NEVER
        self.newest_run: tuple[str | None, int] = (None, 0)  # run id and attempt of the newest
        self.newest_success = _NEVER
        self.newest_failure = _NEVER
        # Not yet sent: the start of the newest attempt in progress, and its time limit.
        self.started: float | None = None
        self.timeout: float | None = None
        self.waited: float | None = None  # ready (or due) to start, in seconds
        self.newest_start = _NEVER
        self.schedule: Schedule = None  # not yet sent
        self.ttl = ttl
        self.counts = schema.Cumulative(buckets) if kind is GroupKind.COUNTERS else None
        self.node: Node | None = None  # counters groups of long-lived processes
        self.pending = 0  # records folded in and not yet committed
        self.seq = 0  # sequence number of the last fold (also the eviction order)
        self.first_pending = 0  # a lower bound of the oldest uncommitted fold's number

    def __repr__(self) -> str:
        return f"<Group {self.path} pending={self.pending}>"

    def fold(self, rec: Record) -> None:
        end = rec.end_time
        if (
            isinstance(rec, TaskRecord)
            and rec.run_id is not None
            and rec.run_id == (self.newest_run[0])
        ):
            newer = rec.attempt >= self.newest_run[1]  # a retry reported after its next try
        else:
            newer = end >= self.newest
        if newer:
            if end > self.newest:
                self.newest = end
            self.last = rec
            if isinstance(rec, TaskRecord):
                self.newest_run = (rec.run_id, rec.attempt)
        status = rec.status
        if status == SUCCESS:
            if end >= self.newest_success:
                self.newest_success = self.success_at = end
        elif status in FAILURE_STATUSES and end >= self.newest_failure:
            self.newest_failure = self.failure_at = end

    def merge(self, e: Entry) -> None:
        """Fold a spooled state in (replay)."""
        if e.last is not None:
            self.fold(e.last)
        if e.success_at is not None and e.success_at >= self.newest_success:
            self.newest_success = self.success_at = e.success_at
        if e.failure_at is not None and e.failure_at >= self.newest_failure:
            self.newest_failure = self.failure_at = e.failure_at
        self.pending += e.records

    def families(self, ns: str) -> list[Metric]:
        ttl = schema.ttl_family(ns, self.framework, self.ttl)
        if self.counts is not None:
            fams = self.counts.families(ns)
            if self.node is not None:
                fams += self.node.families(ns, self.framework, self.counts.tasks())
            return [*fams, ttl]
        fams = schema.last_run_families(
            ns, self.kind.value, self.framework, self.last, self.success_at, self.failure_at
        )
        if self.started is not None:
            fams += schema.start_families(
                ns, self.kind.value, self.framework, self.started, self.timeout, self.waited
            )
        if self.schedule is not None:
            fams += schema.schedule_families(ns, self.kind.value, self.framework, *self.schedule)
        fams.append(ttl)
        return fams

    def entry(self, ns: str) -> Entry:
        """The spool's copy of what is pending here."""
        return _entry(self, ns, self.last, self.success_at, self.failure_at, self.pending)


def _entry(
    g: Group,
    ns: str,
    last: Record | None,
    success_at: float | None,
    failure_at: float | None,
    records: int,
) -> Entry:
    clean = schema.clean(last) if last is not None else None
    return Entry(g.kind.value, g.key, ns, clean, success_at, failure_at, records)


class Snapshot(NamedTuple):
    """What one push of ``group`` sends: built under the lock, encoded outside it."""

    group: Group
    families: list[Metric]
    seq: int
    pending: int
    last: Record | None
    success_at: float | None
    failure_at: float | None
    started: float | None = None
    schedule: Schedule = None

    def entry(self, ns: str) -> Entry:
        """The spool's copy of what this snapshot carries."""
        return _entry(self.group, ns, self.last, self.success_at, self.failure_at, self.pending)


class Table:
    """Groups by key, an index from record names to groups, and the dirty set.

    ``max_groups`` bounds memory: a new group past it evicts the least recently
    used settled (fully delivered) last-run groups. Counters groups are never
    evicted (their counts would restart from zero at the gateway). When nothing
    can be evicted, :meth:`fold_task` / :meth:`fold_flow` return False.
    """

    def __init__(
        self,
        job: str | None,
        static: Mapping[str, str],
        max_groups: int,
        ttl: float | None = None,
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        """``ttl``: every group's expiry; None: :data:`DEFAULT_TTL`, longer for
        a group whose schedule's intervals are long (:meth:`schedule`).
        ``buckets``: the duration histograms' bounds in counters groups."""
        self._job = job
        self._static = tuple(sorted(static.items()))
        self.max_groups = max_groups
        self._ttl = ttl
        self._buckets = buckets
        self._groups: dict[GroupKey, Group] = {}
        self._index: dict[tuple[object, ...], Group] = {}
        self._dirty: dict[Group, None] = {}  # insertion-ordered set
        self._nodes: list[Group] = []  # counters groups with a node (never evicted)
        self.seq = 0

    # -- folding (the caller's thread) ----------------------------------------------

    def fold_task(self, rec: TaskRecord, counters: tuple[tuple[str, str], ...] | None) -> bool:
        """Fold one attempt (and, with ``counters``, count it in that counters group).
        False when a group had to be refused (the cap)."""
        ok = True
        g = self._index.get((rec.framework, rec.flow, rec.task))
        if g is None:
            g = self._lookup(GroupKind.TASK, rec)
        if g is None:
            ok = False
        else:
            g.fold(rec)
            self._touch(g)
        if counters is not None:
            cg = self._index.get((rec.framework, counters)) or self._counters(
                rec.framework, counters
            )
            if cg is None:
                ok = False
            else:
                assert cg.counts is not None
                cg.counts.add(rec)
                self._touch(cg)
        return ok

    def fold_flow(self, rec: FlowRecord) -> bool:
        g = self._index.get((rec.framework, rec.flow))
        if g is None:
            g = self._lookup(GroupKind.FLOW, rec)
            if g is None:
                return False
        g.fold(rec)
        self._touch(g)
        return True

    def start(
        self,
        framework: str,
        flow: str,
        task: str | None,
        at: float,
        timeout: float | None,
        waited: float | None = None,
    ) -> bool:
        """An attempt of ``task`` (or, with None, a run of ``flow``) started at
        ``at``: due for a push while it runs. Not a record: it is not counted and
        not spooled (the end is)."""
        g = self._index.get((framework, flow, task) if task is not None else (framework, flow))
        if g is None:
            g = self._lookup_names(framework, flow, task)
            if g is None:
                return False
        # Group.start and _mark, inlined: this runs for every Celery attempt
        # (bench/bench_start.py), and two calls were a fifth of its cost.
        if at >= g.newest_start:
            g.newest_start = g.started = at
            g.timeout, g.waited = timeout, waited
        self.seq = seq = self.seq + 1
        g.seq = seq
        if g not in self._dirty:
            g.first_pending = seq
            self._dirty[g] = None
        return True

    def schedule(
        self,
        framework: str,
        flow: str,
        task: str | None,
        next_run: float | Mapping[str, float] | None,
        grace: float,
        interval: float | None = None,
        delay: float | None = None,
    ) -> bool:
        """The next scheduled run of ``task`` (or, with None, of ``flow``) is due
        at ``next_run`` (by entry name, for several entries); None: it has no
        schedule now (paused, removed), and its schedule series go. ``interval``:
        the schedule's period, which makes the group live longer than
        :data:`TTL_INTERVALS` of them; ``delay``: how late the run that starts
        now started after its tick. Not a record (not counted, not spooled)."""
        g = self._index.get((framework, flow, task) if task is not None else (framework, flow))
        if g is None:
            g = self._lookup_names(framework, flow, task)
            if g is None:
                return False
        g.schedule = (next_run, grace, delay)
        if self._ttl is None and interval is not None:
            g.ttl = max(DEFAULT_TTL, TTL_INTERVALS * interval + grace)
        self._mark(g)
        return True

    def _touch(self, g: Group) -> None:
        self._mark(g)
        g.pending += 1

    def _mark(self, g: Group) -> None:
        """Due for a push (a record, or a worker's liveness)."""
        self.seq += 1
        g.seq = self.seq
        if g not in self._dirty:
            g.first_pending = self.seq
            self._dirty[g] = None

    # -- long-lived processes' liveness ---------------------------------------------

    def node(
        self, framework: str, counters: tuple[tuple[str, str], ...], node: Node, now: float
    ) -> bool:
        """Attach ``node`` to its counters group (created if need be) and mark it
        due. False when the group cap refused it."""
        g = self._counters(framework, counters)
        if g is None:
            return False
        node.last_seen = now
        if g.node is None:
            self._nodes.append(g)
        g.node = node
        self._mark(g)
        return True

    def node_down(self, framework: str, counters: tuple[tuple[str, str], ...], now: float) -> None:
        g = self._index.get((framework, counters))
        if g is not None and g.node is not None and g.node.up:
            g.node.up = False
            g.node.last_seen = now
            self._mark(g)

    def beat(self, now: float) -> None:
        """Every running node is seen now: push its liveness."""
        for g in self._nodes:
            if g.node is not None and g.node.up:
                g.node.last_seen = now
                self._mark(g)

    def _lookup(self, kind: GroupKind, rec: Record) -> Group | None:
        """The group for a record whose names are not in the index yet (a new
        group, one evicted earlier, or names that clean to an existing group's)."""
        task = rec.task if isinstance(rec, TaskRecord) else None
        return self._lookup_names(rec.framework, rec.flow, task)

    def _lookup_names(self, framework: str, flow: str, task: str | None) -> Group | None:
        job = self._job if self._job is not None else framework
        if task is not None:
            clean = schema.clean_value(flow), schema.clean_value(task)
            key: GroupKey = (("job", job), ("flow", clean[0]), ("task", clean[1]), *self._static)
            return self._group(GroupKind.TASK, key, framework, (framework, flow, task))
        key = (("job", job), ("flow", schema.clean_value(flow)), *self._static)
        return self._group(GroupKind.FLOW, key, framework, (framework, flow))

    def _counters(self, framework: str, counters: tuple[tuple[str, str], ...]) -> Group | None:
        g = self._index.get((framework, counters))
        if g is not None:
            return g
        job = self._job if self._job is not None else framework
        key: GroupKey = (("job", job), *sorted(counters), *self._static)
        return self._group(GroupKind.COUNTERS, key, framework, (framework, counters))

    def _group(
        self, kind: GroupKind, key: GroupKey, framework: str, alias: tuple[object, ...]
    ) -> Group | None:
        g = self._groups.get(key)
        if g is None:
            if len(self._groups) >= self.max_groups and not self._evict():
                return None
            ttl = DEFAULT_TTL if self._ttl is None else self._ttl
            g = self._groups[key] = Group(kind, key, framework, ttl, self._buckets)
        g.aliases.append(alias)
        self._index[alias] = g
        return g

    def _evict(self) -> bool:
        """Forget the least recently used tenth of the settled last-run groups
        (one scan for many new groups). True if any went."""
        settled = [
            g for g in self._groups.values() if not g.pending and g.kind is not GroupKind.COUNTERS
        ]
        if not settled:
            return False
        settled.sort(key=lambda g: g.seq)
        for g in settled[: max(1, self.max_groups // 10)]:
            del self._groups[g.key]
            for alias in g.aliases:
                self._index.pop(alias, None)
        return True

    # -- delivering (the sender's thread) --------------------------------------------

    def dirty(self) -> list[Group]:
        return list(self._dirty)

    def snapshot(self, g: Group, ns: str) -> Snapshot:
        return Snapshot(
            g,
            g.families(ns),
            g.seq,
            g.pending,
            g.last,
            g.success_at,
            g.failure_at,
            g.started,
            g.schedule,
        )

    def commit(self, snap: Snapshot) -> None:
        """What ``snap`` carried reached the gateway (or the spool, or was given up
        on): clear exactly that."""
        g = snap.group
        if g.last is snap.last:
            g.last = None
        if g.success_at == snap.success_at:
            g.success_at = None
        if g.failure_at == snap.failure_at:
            g.failure_at = None
        if g.started == snap.started:
            g.started = None
        if g.schedule is snap.schedule:
            g.schedule = None
        g.pending = max(g.pending - snap.pending, 0)
        # Anything folded or marked during the push (a record, a start, a node's
        # shutdown) is still due.
        if g.seq == snap.seq:
            g.pending = 0
            self._dirty.pop(g, None)
        else:
            g.first_pending = snap.seq + 1

    def settled(self) -> int:
        """Every fold numbered this or lower is committed."""
        if not self._dirty:
            return self.seq
        return min(g.first_pending for g in self._dirty) - 1

    def pending(self) -> int:
        return sum(g.pending for g in self._dirty)

    def absorb(self, kind: GroupKind, key: GroupKey, e: Entry) -> bool:
        """Merge a spooled state into this table's own pending group of that key,
        if there is one (its next push then carries whichever is newer). True if
        taken."""
        g = self._groups.get(key)
        if g is None or not g.pending or g.kind is not kind:
            return False
        g.merge(e)
        self.seq += 1
        g.seq = self.seq
        return True

    def __len__(self) -> int:
        return len(self._groups)
