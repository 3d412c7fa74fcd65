"""What the Pushgateway holds: its groups read back as plain data, and deleting one.

Reads ``/api/v1/metrics`` (the gateway's JSON view of every group) and
``/api/v1/status``; deletes with ``DELETE /metrics/<grouping key>``. Used by the
``status``, ``gc``, ``delete`` and ``doctor`` commands, never by the push path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import schema
from .durations import parse_duration as parse_duration  # re-exported
from .transport import Outcome, Reason, Transport


class GatewayError(Exception):
    """The gateway could not be read: ``outcome`` says why."""

    def __init__(self, what: str, outcome: Outcome) -> None:
        reason = outcome.error or f"HTTP {outcome.status}"
        if outcome.status:
            reason = f"HTTP {outcome.status}: {reason}"
        super().__init__(f"{what}: {reason}")
        self.outcome = outcome


@dataclass
class GroupInfo:
    """One group at the gateway, with what our metrics say about its last run.

    Timestamps are unix seconds; ``None`` where the group has no such value
    (another tool's group, a task that never succeeded, ...).
    """

    labels: dict[str, str]
    push_time: float | None = None
    push_failure_time: float | None = None
    framework: str | None = None
    kind: str | None = None  # "task", "flow", "counters" or None (not ours)
    status: str | None = None
    duration: float | None = None
    completed_at: float | None = None
    success_at: float | None = None
    failure_at: float | None = None
    started_at: float | None = None  # the last attempt's (run's) start
    timeout: float | None = None
    next_run: float | None = None  # the earliest, when schedule entries are several
    grace: float | None = None
    ttl: float | None = None  # the expiry its client declared
    metric_names: list[str] = field(default_factory=list)
    #: A counters group's counts: (framework, flow, task, status) -> runs, where
    #: ``task`` is None for a flow run's.
    runs: dict[tuple[str, str, str | None, str], float] = field(default_factory=dict)

    @property
    def in_progress(self) -> bool:
        """Started after its last completion (or never completed)."""
        return self.started_at is not None and (
            self.completed_at is None or self.started_at > self.completed_at
        )

    @property
    def expires_at(self) -> float | None:
        """When ``orchestrator-push gc`` may delete it: its last push plus its
        declared TTL; None when it declares none (gc by TTL keeps it)."""
        if self.push_time is None or self.ttl is None:
            return None
        return self.push_time + self.ttl

    @property
    def job(self) -> str:
        return self.labels.get("job", "")

    def key(self) -> schema.GroupKey:
        """The grouping key, ``job`` first as the gateway's URL wants it."""
        rest = sorted((k, v) for k, v in self.labels.items() if k != "job")
        return (("job", self.job), *rest)


def first_value(family: Mapping[str, Any] | None) -> float | None:
    """The first sample's value of a family of ``/api/v1/metrics`` (None: none)."""
    if not family:
        return None
    for m in family.get("metrics", []):
        if "value" in m:
            return float(m["value"])
    return None


def _earliest(family: Mapping[str, Any] | None) -> float | None:
    values = [float(m["value"]) for m in (family or {}).get("metrics", []) if "value" in m]
    return min(values) if values else None


def parse_groups(data: Iterable[Mapping[str, Any]], namespace: str) -> list[GroupInfo]:
    """``/api/v1/metrics`` ``data`` into :class:`GroupInfo` (pure, for tests)."""
    out = []
    for entry in data:
        g = GroupInfo(labels=dict(entry.get("labels", {})))
        g.metric_names = sorted(
            k for k, v in entry.items() if isinstance(v, dict) and "metrics" in v
        )
        g.push_time = first_value(entry.get("push_time_seconds")) or None
        g.push_failure_time = first_value(entry.get("push_failure_time_seconds")) or None
        g.ttl = first_value(entry.get(f"{namespace}_push_group_ttl_seconds"))
        for kind in ("task", "flow"):
            status_family = entry.get(f"{namespace}_{kind}_last_status")
            start_family = entry.get(f"{namespace}_{kind}_last_start_timestamp_seconds")
            due_family = entry.get(f"{namespace}_{kind}_next_run_timestamp_seconds")
            if not status_family and not start_family and not due_family:
                continue
            g.kind = kind
            g.started_at = first_value(start_family)
            g.next_run = _earliest(due_family)
            g.grace = first_value(entry.get(f"{namespace}_{kind}_schedule_grace_seconds"))
            g.timeout = first_value(entry.get(f"{namespace}_{kind}_timeout_seconds"))
            for family in (start_family, due_family):
                for m in (family or {}).get("metrics", []) if g.framework is None else []:
                    g.framework = m.get("labels", {}).get("framework")
            for m in (status_family or {}).get("metrics", []):
                g.framework = m.get("labels", {}).get("framework", g.framework)
                if float(m.get("value", 0)) == 1:
                    g.status = m.get("labels", {}).get("status")
            g.duration = first_value(entry.get(f"{namespace}_{kind}_last_duration_seconds"))
            g.completed_at = first_value(
                entry.get(f"{namespace}_{kind}_last_completion_timestamp_seconds")
            )
            g.success_at = first_value(
                entry.get(f"{namespace}_{kind}_last_success_timestamp_seconds")
            )
            g.failure_at = first_value(
                entry.get(f"{namespace}_{kind}_last_failure_timestamp_seconds")
            )
        for name in (f"{namespace}_task_runs_total", f"{namespace}_flow_runs_total"):
            if g.kind in (None, "counters") and name in entry:
                g.kind = "counters"
                for m in entry[name].get("metrics", []):
                    g.framework = m.get("labels", {}).get("framework", g.framework)
        if g.kind == "counters":
            g.runs = _runs(entry, namespace)
        out.append(g)
    return out


def _runs(
    entry: Mapping[str, Any], namespace: str
) -> dict[tuple[str, str, str | None, str], float]:
    """A counters group's ``task_runs_total`` and ``flow_runs_total`` samples."""
    out: dict[tuple[str, str, str | None, str], float] = {}
    for kind in ("task", "flow"):
        for m in (entry.get(f"{namespace}_{kind}_runs_total") or {}).get("metrics", []):
            labels = m.get("labels", {})
            task = labels.get("task", "") if kind == "task" else None
            key = (
                labels.get("framework", ""),
                labels.get("flow", ""),
                task,
                labels.get("status", ""),
            )
            out[key] = out.get(key, 0.0) + float(m.get("value", 0))
    return out


#: Reading every group of a big gateway (10,000 groups: tens of MiB) takes
#: seconds: longer than a push's timeout.
READ_TIMEOUT = 60.0


def read_json(transport: Transport, path: str) -> Any:
    outcome, body = transport.fetch("GET", path, read_timeout=READ_TIMEOUT)
    if not outcome.ok:
        raise GatewayError(f"GET {path}", outcome)
    try:
        return json.loads(body)["data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise GatewayError(
            f"GET {path}",
            Outcome(0, f"not a Pushgateway answer ({type(exc).__name__})", Reason.CONNECTION),
        ) from None


def list_groups(transport: Transport, namespace: str) -> list[GroupInfo]:
    """Every group the gateway holds."""
    return parse_groups(read_json(transport, "/api/v1/metrics") or [], namespace)


def gateway_info(transport: Transport) -> dict[str, Any]:
    """``/api/v1/status``: ``build_information`` (version) and ``flags``."""
    data = read_json(transport, "/api/v1/status")
    return data if isinstance(data, dict) else {}


def delete_group(transport: Transport, key: schema.GroupKey) -> Outcome:
    """Delete exactly the group with this grouping key (``job`` first)."""
    return transport.request("DELETE", schema.group_path(key))


def format_age(seconds: float | None) -> str:
    """A short age: ``45s``, ``12m``, ``3h``, ``2d``; ``-`` for none."""
    if seconds is None:
        return "-"
    s = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"
