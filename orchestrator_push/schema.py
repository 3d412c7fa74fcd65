"""The metric schema (docs/metrics.md): records in, Pushgateway groups and families out.

This is the only module that knows metric names, types and HELP texts, so they
are identical in every group and every process (the Pushgateway rejects a push
whose type differs from the same name in another group).
"""

from __future__ import annotations

import base64
import bisect
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import Enum

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .config import DEFAULT_BUCKETS, check_buckets
from .records import FAILURE_STATUSES, SUCCESS, FlowRecord, TaskRecord, statuses_for

GroupKey = tuple[tuple[str, str], ...]


class GroupKind(str, Enum):
    """What a Pushgateway group of ours holds; one vocabulary for the engine, the
    spool and the commands that read the gateway back."""

    TASK = "task"  # the last run of one task
    FLOW = "flow"  # the last run of one flow
    COUNTERS = "counters"  # cumulative counts of one node or host

    def __str__(self) -> str:  # the same in f-strings on every Python
        return self.value


_INF = float("inf")

_HELP = {
    "task_last_duration_seconds": "Duration of the last finished attempt of the task.",
    "task_last_completion_timestamp_seconds": "Unix time the last attempt of the task finished.",
    "task_last_success_timestamp_seconds": "Unix time of the last successful attempt of the task.",
    "task_last_failure_timestamp_seconds": "Unix time of the last final failure of the task.",
    "task_last_status": "1 for the outcome of the last attempt of the task, 0 for other statuses.",
    "task_last_attempt": "Attempt number of the last finished attempt (1 = first try).",
    "task_last_exit_code": "Exit code of the last run of the command (128+N: killed by signal N).",
    "flow_last_duration_seconds": "Duration of the last finished run of the flow.",
    "flow_last_completion_timestamp_seconds": "Unix time the last run of the flow finished.",
    "flow_last_success_timestamp_seconds": "Unix time of the last successful run of the flow.",
    "flow_last_failure_timestamp_seconds": "Unix time of the last failed run of the flow.",
    "flow_last_status": "1 for the outcome of the last run of the flow, 0 for other statuses.",
    "task_runs": "Finished task attempts, by outcome.",
    "flow_runs": "Finished flow runs, by outcome.",
    "flow_duration_seconds": "Duration of finished flow runs, by outcome.",
    "push_records_dropped": "Records this process gave up on, by reason (its total so far).",
    "push_records_spooled": "Records this process wrote to the local spool (its total so far).",
    "push_records_replayed": "Spooled records this process delivered (its total so far).",
    "push_failures": "Failed pushes of this process, by reason (its total so far).",
    "push_interval_seconds": "Seconds between this process's pushes now "
    "(longer than configured while the gateway is slow or failing).",
    "task_duration_seconds": "Duration of finished task attempts, by outcome.",
    "task_last_start_timestamp_seconds": "Unix time the last attempt of the task started.",
    "task_timeout_seconds": "Time limit of the task's attempts as set in the framework.",
    "flow_last_start_timestamp_seconds": "Unix time the last run of the flow started.",
    "flow_timeout_seconds": "Time limit of the flow's runs as set in the framework.",
    "flow_last_start_delay_seconds": "How late the last flow run started after its schedule.",
    "task_last_queued_duration_seconds": "Time the last attempt waited between ready and started.",
    "task_queued_seconds": "Time finished task attempts waited between being ready and starting.",
    "worker_up": "1 while the worker process runs, 0 once it shut down cleanly.",
    "worker_last_seen_timestamp_seconds": "Unix time of the worker process's latest push.",
    "tasks_running": "Task attempts in progress on this worker.",
    "task_oldest_running_start_timestamp_seconds": (
        "Unix time the oldest attempt in progress on this worker started."
    ),
    "task_next_run_timestamp_seconds": "Unix time the next scheduled run of the task is due.",
    "flow_next_run_timestamp_seconds": "Unix time the next scheduled run of the flow is due.",
    "task_schedule_grace_seconds": "How late a scheduled run of the task may start.",
    "flow_schedule_grace_seconds": "How late a scheduled run of the flow may start.",
    "push_group_ttl_seconds": "Seconds after its last push that this group may be deleted.",
}

#: The families a schedule sets, by kind.
SCHEDULE_SUFFIXES = ("next_run_timestamp_seconds", "schedule_grace_seconds")

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.~-]+$")


#: What an empty flow or task name is sent as: an empty label value and no label
#: are the same series in Prometheus, and would merge a task's group with its flow's.
EMPTY = "(empty)"


def clean_value(value: str) -> str:
    """A label value Prometheus can hold: never empty, valid UTF-8 (a lone
    surrogate, which a str may carry, becomes U+FFFD)."""
    if not value:
        return EMPTY
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value


def clean(rec: TaskRecord | FlowRecord) -> TaskRecord | FlowRecord:
    """``rec`` with flow and task names made safe (the same object when they are)."""
    flow = clean_value(rec.flow)
    task = clean_value(rec.task) if isinstance(rec, TaskRecord) else ""
    if flow == rec.flow and (not isinstance(rec, TaskRecord) or task == rec.task):
        return rec
    if isinstance(rec, TaskRecord):
        return rec._replace(flow=flow, task=task)
    return rec._replace(flow=flow)


def task_group(job: str, rec: TaskRecord, static: Mapping[str, str]) -> GroupKey:
    return (("job", job), ("flow", rec.flow), ("task", rec.task), *sorted(static.items()))


def flow_group(job: str, rec: FlowRecord, static: Mapping[str, str]) -> GroupKey:
    return (("job", job), ("flow", rec.flow), *sorted(static.items()))


def group_path(key: GroupKey) -> str:
    """The ``/metrics/...`` path of a group.

    Values that are not plain URL-safe words (``/``, empty, spaces, quotes,
    unicode...) go as ``name@base64/<urlsafe base64>``, which the Pushgateway
    decodes exactly; ``=`` is its spelling of the empty string.
    """
    parts = ["/metrics"]
    for name, value in key:
        if _SAFE_VALUE.match(value) and value not in (".", ".."):  # a path would drop those
            parts += [name, value]
        elif value == "":
            parts += [f"{name}@base64", "="]
        else:
            raw = value.encode("utf-8", errors="surrogateescape")
            parts += [f"{name}@base64", base64.urlsafe_b64encode(raw).decode("ascii")]
    return "/".join(parts)


def _gauge(ns: str, suffix: str, value: float, framework: str) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(f"{ns}_{suffix}", _HELP[suffix], labels=["framework"])
    fam.add_metric([framework], value)
    return fam


def _status(ns: str, suffix: str, framework: str, status: str) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(f"{ns}_{suffix}", _HELP[suffix], labels=["framework", "status"])
    known = statuses_for(framework)
    for s in known if status in known else (*known, status):
        fam.add_metric([framework, s], 1.0 if s == status else 0.0)
    return fam


def last_run_families(
    ns: str,
    kind: str,
    framework: str,
    last: TaskRecord | FlowRecord | None,
    success_at: float | None = None,
    failure_at: float | None = None,
) -> list[Metric]:
    """The last-run series (``kind`` "task" or "flow") for one group.

    ``last`` is the newest finished attempt not yet sent; ``success_at`` and
    ``failure_at`` are the newest success and final-failure times not yet sent.
    Only the metric names present are replaced at the gateway (POST), which is
    how the last success survives a later failure.
    """
    fams: list[Metric] = []
    if last is not None:
        fams += [
            _gauge(ns, f"{kind}_last_duration_seconds", max(last.duration, 0.0), framework),
            _gauge(ns, f"{kind}_last_completion_timestamp_seconds", last.end_time, framework),
            _status(ns, f"{kind}_last_status", framework, last.status),
        ]
        if isinstance(last, TaskRecord):
            fams.append(_gauge(ns, "task_last_attempt", last.attempt, framework))
            if last.exit_code is not None:
                fams.append(_gauge(ns, "task_last_exit_code", last.exit_code, framework))
            q = last.queued
            if q is not None and 0.0 <= q < _INF:
                fams.append(_gauge(ns, "task_last_queued_duration_seconds", q, framework))
    if success_at is not None:
        fams.append(_gauge(ns, f"{kind}_last_success_timestamp_seconds", success_at, framework))
    if failure_at is not None:
        fams.append(_gauge(ns, f"{kind}_last_failure_timestamp_seconds", failure_at, framework))
    return fams


def start_families(
    ns: str,
    kind: str,
    framework: str,
    started: float,
    timeout: float | None,
    waited: float | None = None,
) -> list[Metric]:
    """An attempt (``kind`` "task") or run ("flow") in progress since ``started``;
    ``waited``: a task's queue wait, a flow run's delay after its scheduled start."""
    fams: list[Metric] = [_gauge(ns, f"{kind}_last_start_timestamp_seconds", started, framework)]
    if timeout is not None and 0.0 < timeout < _INF:
        fams.append(_gauge(ns, f"{kind}_timeout_seconds", timeout, framework))
    if waited is not None and 0.0 <= waited < _INF:
        name = (
            "task_last_queued_duration_seconds"
            if kind == "task"
            else "flow_last_start_delay_seconds"
        )
        fams.append(_gauge(ns, name, waited, framework))
    return fams


def schedule_families(
    ns: str,
    kind: str,
    framework: str,
    next_run: float | Mapping[str, float] | None,
    grace: float,
    delay: float | None = None,
) -> list[Metric]:
    """When the next scheduled run (``kind`` "task" or "flow") is due, and how
    late it may start. A mapping is one series per schedule entry (label
    ``schedule``: Celery beat's entry names), grace included; None (a paused
    schedule) sends the grace alone (see :func:`removal`). ``delay``: how late
    the run that started now started after its tick (exec, whose task group is
    its only one)."""
    fams: list[Metric] = []
    if isinstance(next_run, Mapping):
        labels = ["framework", "schedule"]
        names = [f"{kind}_{suffix}" for suffix in SCHEDULE_SUFFIXES]
        due = GaugeMetricFamily(f"{ns}_{names[0]}", _HELP[names[0]], labels=labels)
        late = GaugeMetricFamily(f"{ns}_{names[1]}", _HELP[names[1]], labels=labels)
        for entry, at in sorted(next_run.items()):
            due.add_metric([framework, clean_value(entry)], at)
            late.add_metric([framework, clean_value(entry)], grace)
        fams += [due, late]
    else:
        if next_run is not None:
            fams.append(_gauge(ns, f"{kind}_next_run_timestamp_seconds", next_run, framework))
        fams.append(_gauge(ns, f"{kind}_schedule_grace_seconds", grace, framework))
    if delay is not None and 0.0 <= delay < _INF:
        fams.append(_gauge(ns, "flow_last_start_delay_seconds", delay, framework))
    return fams


def ttl_family(ns: str, framework: str, ttl: float) -> Metric:
    """The group's expiry, declared by its client (``orchestrator-push gc``)."""
    return _gauge(ns, "push_group_ttl_seconds", ttl, framework)


#: The Pushgateway's content type for length-delimited protobuf MetricFamily messages.
PROTOBUF = (
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
)


def removal(ns: str, kind: str) -> bytes:
    """A push body that removes a group's next-run series (a paused or removed
    schedule; its grace stays, the mark of a flow that has a schedule): the
    family sent with no sample, which only the protobuf format can say (the
    text parser drops an empty family). POSTed, it replaces the family at the
    gateway, which exposes a family with no sample as nothing. The message is
    one length-delimited MetricFamily {1: name, 2: help, 3: type GAUGE}."""
    suffix = f"{kind}_next_run_timestamp_seconds"
    msg = _pb_text(1, f"{ns}_{suffix}") + _pb_text(2, _HELP[suffix])
    msg += b"\x18\x01"  # field 3 (type), varint 1 (GAUGE)
    return _varint(len(msg)) + msg


def _pb_text(field_number: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    return bytes([field_number << 3 | 2]) + _varint(len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def task_families(ns: str, rec: TaskRecord) -> list[Metric]:
    """The families of a single task record (docs/metrics.md, last run of each task)."""
    return _single(ns, rec)


def flow_families(ns: str, rec: FlowRecord) -> list[Metric]:
    """The families of a single flow record (docs/metrics.md, last run of each flow)."""
    return _single(ns, rec)


def _single(ns: str, rec: TaskRecord | FlowRecord) -> list[Metric]:
    return last_run_families(
        ns,
        "task" if isinstance(rec, TaskRecord) else "flow",
        rec.framework,
        rec,
        rec.end_time if rec.status == SUCCESS else None,
        rec.end_time if rec.status in FAILURE_STATUSES else None,
    )


CumulativeKey = tuple[str, str, str, str]  # framework, flow, task, status


def rebucket(old: Sequence[float], counts: list[int], new: Sequence[float]) -> list[int]:
    """Per-bucket counts kept with the ``old`` bounds, moved to the ``new`` ones
    (both ending with +Inf). Each old bucket goes to the first new bucket whose
    bound is at or above its own: exact when the new bounds are some of the old
    ones, and the count at any bound both have is unchanged (so it never goes
    down at the gateway); otherwise a duration may land above its own bucket,
    never below it.

    >>> rebucket([1, 5, 10, float("inf")], [2, 3, 4, 1], [5, float("inf")])
    [5, 5]
    """
    out = [0] * len(new)
    for bound, n in zip(old, counts, strict=True):
        out[bisect.bisect_left(new, bound)] += n
    return out


def _bounds(raw: object) -> tuple[float, ...]:
    """Finite bounds read back from a file; ValueError unless valid."""
    if not isinstance(raw, (list, tuple)):
        raise ValueError("bounds")
    out = tuple(raw)
    check_buckets(out)
    return tuple(float(b) for b in out)


class _Series:
    __slots__ = ("bounds", "buckets", "count", "labels", "total")

    def __init__(self, labels: list[str], bounds: tuple[float, ...]) -> None:
        self.labels = labels  # framework, flow, task(, status) as sent (names cleaned)
        self.bounds = bounds  # ending with +Inf
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * len(bounds)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip(self.bounds, self.buckets, strict=True):
            acc += n
            out.append((_le(bound), float(acc)))
        return out


class Cumulative:
    """Cumulative counts and duration histograms of one long-lived process (or node)."""

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        """``bounds``: the buckets' finite upper bounds, ascending (``+Inf`` is added)."""
        self.bounds = (*bounds, _INF)
        #: by the record's own names (the fast path), and by the names as sent: two
        #: spellings that clean to one label value share one series.
        self.series: dict[CumulativeKey, _Series] = {}
        self._sent: dict[tuple[str, ...], _Series] = {}
        #: queue waits by (framework, flow, task), the record's names and as sent
        self.queued: dict[tuple[str, str, str], _Series] = {}
        self._queued_sent: dict[tuple[str, ...], _Series] = {}
        #: flow runs by (framework, flow, status) as sent
        self._flows: dict[tuple[str, ...], _Series] = {}

    def add(self, rec: TaskRecord) -> None:
        """Count one attempt; its duration must be finite and not negative."""
        key = (rec.framework, rec.flow, rec.task, rec.status)
        s = self.series.get(key)
        if s is None:
            labels = [rec.framework, clean_value(rec.flow), clean_value(rec.task), rec.status]
            s = self.series[key] = self._shared(self._sent, labels)
        s.observe(rec.duration)
        q = rec.queued
        if q is not None and 0.0 <= q < _INF:
            qkey = (rec.framework, rec.flow, rec.task)
            qs = self.queued.get(qkey)
            if qs is None:
                labels = [rec.framework, clean_value(rec.flow), clean_value(rec.task)]
                qs = self.queued[qkey] = self._shared(self._queued_sent, labels)
            qs.observe(q)

    def add_flow(self, rec: FlowRecord) -> None:
        """Count one flow run; its duration must be finite and not negative."""
        labels = [rec.framework, clean_value(rec.flow), rec.status]
        self._shared(self._flows, labels).observe(rec.duration)

    def dump(self) -> list[dict[str, object]]:
        """Runs and durations as plain data (queue waits are not carried); a
        row with three labels is a flow's, with four a task's."""
        return [
            {"labels": s.labels, "count": s.count, "sum": s.total, "buckets": s.buckets}
            for s in [*self._sent.values(), *self._flows.values()]
        ]

    def absorb(
        self, rows: Iterable[Mapping[str, object]], bounds: Sequence[float] | None = None
    ) -> None:
        """Add what :meth:`dump` wrote; ``bounds``: the finite bounds it was
        counted with (None: this one's). Counts kept with other bounds move to
        these (:func:`rebucket`). Raises ValueError on a row of another shape:
        nothing of that call is added then."""
        theirs = self.bounds if bounds is None else (*_bounds(bounds), _INF)
        parsed = []
        for row in rows:
            labels, buckets = row["labels"], row["buckets"]
            if not isinstance(labels, list) or len(labels) not in (3, 4):
                raise ValueError("labels")
            if not isinstance(buckets, list) or len(buckets) != len(theirs):
                raise ValueError("buckets")
            count, total = row["count"], row["sum"]
            if not isinstance(count, int) or not isinstance(total, (int, float)):
                raise ValueError("count")
            counts = [int(n) for n in buckets]
            if theirs != self.bounds:
                counts = rebucket(theirs, counts, self.bounds)
            parsed.append(([str(v) for v in labels], count, float(total), counts))
        for labels, count, total, counts in parsed:
            s = self._shared(self._sent if len(labels) == 4 else self._flows, labels)
            s.count += count
            s.total += total
            s.buckets = [a + b for a, b in zip(s.buckets, counts, strict=True)]

    def _shared(self, sent: dict[tuple[str, ...], _Series], labels: list[str]) -> _Series:
        """The series sent with these labels: two spellings that clean to one value share it."""
        s = sent.get(tuple(labels))
        if s is None:
            s = sent[tuple(labels)] = _Series(labels, self.bounds)
        return s

    def __len__(self) -> int:
        return sum(s.count for s in [*self._sent.values(), *self._flows.values()])

    def tasks(self) -> list[tuple[str, str]]:
        """The (flow, task) names counted here (as sent)."""
        return list(dict.fromkeys((s.labels[1], s.labels[2]) for s in self._sent.values()))

    def families(self, ns: str) -> list[Metric]:
        labels = ["framework", "flow", "task", "status"]
        runs = CounterMetricFamily(f"{ns}_task_runs", _HELP["task_runs"], labels=labels)
        hist = HistogramMetricFamily(
            f"{ns}_task_duration_seconds", _HELP["task_duration_seconds"], labels=labels
        )
        for s in sorted(self._sent.values(), key=lambda s: s.labels):
            runs.add_metric(s.labels, s.count)
            hist.add_metric(s.labels, s.cumulative(), s.total)
        fams: list[Metric] = [runs, hist]
        if self._queued_sent:
            queued = HistogramMetricFamily(
                f"{ns}_task_queued_seconds", _HELP["task_queued_seconds"], labels=labels[:3]
            )
            for s in sorted(self._queued_sent.values(), key=lambda s: s.labels):
                queued.add_metric(s.labels, s.cumulative(), s.total)
            fams.append(queued)
        if self._flows:
            flow_labels = ["framework", "flow", "status"]
            flow_runs = CounterMetricFamily(
                f"{ns}_flow_runs", _HELP["flow_runs"], labels=flow_labels
            )
            flow_hist = HistogramMetricFamily(
                f"{ns}_flow_duration_seconds", _HELP["flow_duration_seconds"], labels=flow_labels
            )
            for s in sorted(self._flows.values(), key=lambda s: s.labels):
                flow_runs.add_metric(s.labels, s.count)
                flow_hist.add_metric(s.labels, s.cumulative(), s.total)
            fams += [flow_runs, flow_hist]
        return fams


#: (flow, task) -> (attempts in progress, unix start time of the oldest)
Running = Mapping[tuple[str, str], tuple[int, float]]


def worker_families(
    ns: str,
    framework: str,
    role: str,
    *,
    up: bool,
    last_seen: float,
    running: Running | None,
    known: Iterable[tuple[str, str]] = (),
) -> list[Metric]:
    """A long-lived process's liveness and, where it says, its attempts in
    progress; ``known`` tasks with none in progress are sent as 0."""
    labels = ["framework", "role"]
    up_f = GaugeMetricFamily(f"{ns}_worker_up", _HELP["worker_up"], labels=labels)
    up_f.add_metric([framework, role], 1.0 if up else 0.0)
    seen_f = GaugeMetricFamily(
        f"{ns}_worker_last_seen_timestamp_seconds",
        _HELP["worker_last_seen_timestamp_seconds"],
        labels=labels,
    )
    seen_f.add_metric([framework, role], last_seen)
    fams: list[Metric] = [up_f, seen_f]
    if running is None:
        return fams
    task_labels = ["framework", "flow", "task"]
    count_f = GaugeMetricFamily(f"{ns}_tasks_running", _HELP["tasks_running"], labels=task_labels)
    oldest_f = GaugeMetricFamily(
        f"{ns}_task_oldest_running_start_timestamp_seconds",
        _HELP["task_oldest_running_start_timestamp_seconds"],
        labels=task_labels,
    )
    names = {(clean_value(f), clean_value(t)): (0, _INF) for f, t in known}
    for (flow, task), (n, oldest) in running.items():
        key = (clean_value(flow), clean_value(task))
        had, first = names.get(key, (0, _INF))
        names[key] = (had + n, min(first, oldest))
    for (flow, task), (n, oldest) in sorted(names.items()):
        count_f.add_metric([framework, flow, task], float(n))
        if n and oldest < _INF:
            oldest_f.add_metric([framework, flow, task], oldest)
    return [*fams, count_f, oldest_f]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Families:
    """The smallest ``Collector``: what ``generate_latest`` needs."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def encode(families: Iterable[Metric]) -> bytes:
    """Prometheus text format 0.0.4, written by prometheus_client."""
    return generate_latest(_Families(families))


def self_families(
    ns: str,
    framework: str,
    *,
    dropped: Mapping[str, int],
    failures: Mapping[str, int],
    spooled: int,
    replayed: int,
    interval: float,
) -> list[Metric]:
    """The pushing process's own counts and push interval, sent with each of its groups."""
    lost = CounterMetricFamily(
        f"{ns}_push_records_dropped", _HELP["push_records_dropped"], labels=["framework", "reason"]
    )
    for reason, n in sorted(dropped.items()):
        lost.add_metric([framework, reason], n)
    failed = CounterMetricFamily(
        f"{ns}_push_failures", _HELP["push_failures"], labels=["framework", "reason"]
    )
    for reason, n in sorted(failures.items()):
        failed.add_metric([framework, reason], n)
    spooled_f = CounterMetricFamily(
        f"{ns}_push_records_spooled", _HELP["push_records_spooled"], labels=["framework"]
    )
    spooled_f.add_metric([framework], spooled)
    replayed_f = CounterMetricFamily(
        f"{ns}_push_records_replayed", _HELP["push_records_replayed"], labels=["framework"]
    )
    replayed_f.add_metric([framework], replayed)
    interval_f = GaugeMetricFamily(
        f"{ns}_push_interval_seconds", _HELP["push_interval_seconds"], labels=["framework"]
    )
    interval_f.add_metric([framework], interval)
    fams: list[Metric] = [lost, spooled_f, replayed_f, interval_f]
    if failures:
        fams.append(failed)
    return fams
