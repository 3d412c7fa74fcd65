"""The operator's commands: ``status``, ``gc``, ``delete``, ``replay`` (``doctor`` is
in doctor.py).

Each takes a :class:`Config`, writes to a stream and returns the exit code:
0 done, 1 the gateway could not be read or a deletion failed (or, for
``delete``, no such group; for ``replay``, something left in the spool),
2 bad arguments or configuration (cli.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from .config import Config
from .gateways import Gateways
from .groups import (
    GatewayError,
    GroupInfo,
    delete_group,
    format_age,
    list_groups,
)
from .ledger import Ledger
from .records import FAILURE_STATUSES
from .replayer import Replayer
from .spool import Spool
from .transport import HttpTransport, Transport, connect

_RED, _YELLOW, _RESET = "\033[31m", "\033[33m", "\033[0m"


def _colour(out: IO[str]) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ


def _describe(labels: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v!r}" if not v or " " in v else f"{k}={v}" for k, v in labels.items())


#: (job, framework, flow, task or None for a flow) -> status -> runs
Totals = dict[tuple[str, str, str, str | None], dict[str, float]]


def _totals(groups: Sequence[GroupInfo]) -> Totals:
    """Every counters group's runs added up per task and flow (the counts of
    every host, worker node and scheduler of a job)."""
    out: Totals = {}
    for g in groups:
        for (framework, flow, task, status), n in g.runs.items():
            per = out.setdefault((g.job, framework, flow, task), {})
            per[status] = per.get(status, 0.0) + n
    return out


def _row(
    g: GroupInfo, now: float, stale_after: float, totals: Totals | None = None
) -> dict[str, Any]:
    notes = []
    if g.push_time is not None and now - g.push_time > stale_after:
        notes.append("stale")
    if g.push_failure_time is not None and (
        g.push_time is None or g.push_failure_time > g.push_time
    ):
        notes.append("push failing")
    return {
        "labels": g.labels,
        "job": g.job,
        "flow": g.labels.get("flow"),
        "task": g.labels.get("task"),
        "framework": g.framework,
        "kind": g.kind,
        "status": g.status,
        "duration_seconds": g.duration,
        "last_completion_timestamp": g.completed_at,
        "last_success_timestamp": g.success_at,
        "last_failure_timestamp": g.failure_at,
        "push_time": g.push_time,
        "push_failure_time": g.push_failure_time,
        "stale": "stale" in notes,
        "push_failing": "push failing" in notes,
        "notes": notes,
        "in_progress": g.in_progress,
        "last_start_timestamp": g.started_at,
        "running_for_seconds": now - g.started_at if g.in_progress and g.started_at else None,
        "timeout_seconds": g.timeout,
        "next_run_timestamp": g.next_run,
        "schedule_grace_seconds": g.grace,
        "ttl_seconds": g.ttl,
        "expires_at": g.expires_at,
        **_counted(g, totals or {}),
    }


def _counted(g: GroupInfo, totals: Totals) -> dict[str, Any]:
    """A task's or flow's runs over the counters' life, by status, and in all."""
    per = None
    if g.kind in ("task", "flow") and g.framework is not None:
        flow = g.labels.get("flow", "")
        task = g.labels.get("task", "") if g.kind == "task" else None
        per = totals.get((g.job, g.framework, flow, task))
    if per is None:
        return {"runs_total": None, "failures_total": None, "runs_by_status": None}
    return {
        "runs_total": sum(per.values()),
        "failures_total": sum(n for s, n in per.items() if s in FAILURE_STATUSES),
        "runs_by_status": dict(sorted(per.items())),
    }


def _runs_cell(r: Mapping[str, Any]) -> str:
    if r["runs_total"] is None:
        return "-"
    total, failed = int(r["runs_total"]), int(r["failures_total"])
    return f"{total} ({failed} failed)" if failed else str(total)


def _ago(now: float, ts: float | None) -> str:
    return "-" if ts is None else format_age(now - ts) + " ago"


def _due(now: float, ts: float | None) -> str:
    if ts is None:
        return "-"
    return f"in {format_age(ts - now)}" if ts >= now else f"{format_age(now - ts)} overdue"


def _seconds(d: float | None) -> str:
    if d is None:
        return "-"
    return f"{d:.2f}s" if d < 60 else format_age(d)


def status(
    config: Config,
    out: IO[str],
    *,
    job: str | None = None,
    as_json: bool = False,
    stale_after: float = 86400.0,
    now: float | None = None,
) -> int:
    """One row per group: last status, last success and failure, duration, last push."""
    now = time.time() if now is None else now
    try:
        groups = _read(config, job)
    except GatewayError as exc:
        return _unreachable(config, exc)
    totals = _totals(groups)
    rows = [_row(g, now, stale_after, totals) for g in groups]
    if as_json:
        json.dump(rows, out, indent=2, sort_keys=True)
        out.write("\n")
        return 0
    if not rows:
        out.write(f"no groups at {config.url}" + (f" for job {job!r}" if job else "") + "\n")
        out.write(_spool_note(config))
        return 0
    header = [
        "JOB",
        "FLOW",
        "TASK",
        "STATUS",
        "LAST SUCCESS",
        "LAST FAILURE",
        "DURATION",
        "RUNS",
        "NEXT RUN",
        "PUSHED",
        "EXPIRES",
        "OTHER LABELS",
        "NOTES",
    ]
    table = [header]
    for r in rows:
        other = {k: v for k, v in r["labels"].items() if k not in ("job", "flow", "task")}
        status_text = r["status"] or ("counters" if r["kind"] == "counters" else "-")
        if r["in_progress"]:  # the previous outcome stays in the JSON's "status"
            status_text = f"running {format_age(r['running_for_seconds'])}"
        table.append(
            [
                r["job"],
                r["flow"] or "-",
                r["task"] or "-",
                status_text,
                _ago(now, r["last_success_timestamp"]),
                _ago(now, r["last_failure_timestamp"]),
                _seconds(r["duration_seconds"]),
                _runs_cell(r),
                _due(now, r["next_run_timestamp"]),
                _ago(now, r["push_time"]),
                _due(now, r["expires_at"]).replace(" overdue", " ago"),
                _describe(other) or "-",
                ", ".join(r["notes"]) or "-",
            ]
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    colour = _colour(out)
    for i, cells in enumerate(table):
        line = "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        if colour and i > 0:
            r = rows[i - 1]
            if r["status"] in FAILURE_STATUSES or r["push_failing"]:
                line = _RED + line + _RESET
            elif r["stale"]:
                line = _YELLOW + line + _RESET
        out.write(line + "\n")
    out.write(_spool_note(config))
    return 0


def _spool_note(config: Config) -> str:
    """This machine's spool, when it holds something (the table's last line)."""
    if not config.spool_dir:
        return ""
    spool = Spool(config.spool_dir, config.spool_max_bytes)
    waiting, bad = spool.pending(), spool.unreadable()
    if not waiting and not bad:
        return ""
    note = f"local spool {config.spool_dir}: {waiting} file(s) waiting"
    if bad:
        note += f", {len(bad)} unreadable (set aside; see `orchestrator-push doctor`)"
    return note + "\n"


def gc(
    config: Config,
    out: IO[str],
    *,
    older_than: float | None = None,
    job: str | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> int:
    """Delete the groups whose last push is older than ``older_than`` seconds,
    or (None) than the TTL each group declares; a group that declares none is
    kept then."""
    now = time.time() if now is None else now
    failed = 0
    # Each gateway on its own: a copy left behind on one (the list of gateways
    # changed) ages there while the group is fresh on another.
    for url in config.urls:
        transport: Transport = HttpTransport(config, url)
        try:
            failed += _gc_one(transport, config, url, out, older_than, job, dry_run, now)
        finally:
            transport.close()
    return 1 if failed else 0


def _gc_one(
    transport: Transport,
    config: Config,
    url: str,
    out: IO[str],
    older_than: float | None,
    job: str | None,
    dry_run: bool,
    now: float,
) -> int:
    """gc on one gateway; the number of deletions that failed (1 if unreadable)."""
    at = f" at {url}" if len(config.urls) > 1 else ""
    try:
        groups = _filter(list_groups(transport, config.namespace), job)
    except GatewayError as exc:
        _unreachable_at(url, exc)
        return 1
    # A group without push_time was never pushed by a client (it cannot be
    # aged): never a candidate.
    if older_than is None:
        old = [g for g in groups if g.expires_at is not None and now > g.expires_at]
        undeclared = sum(g.ttl is None for g in groups)
        if undeclared:
            out.write(
                f"kept {undeclared} group(s){at} that declare no TTL "
                "(another tool's, or older; --older-than DURATION ages them)\n"
            )
    else:
        old = [g for g in groups if g.push_time is not None and now - g.push_time > older_than]
    if not old:
        limit = "their TTL" if older_than is None else format_age(older_than)
        out.write(
            f"nothing to delete{at}: no group{' of job ' + repr(job) if job else ''} "
            f"last pushed more than {limit} ago\n"
        )
        return 0
    failed = 0
    for g in old:
        age = format_age(now - (g.push_time or now))
        if older_than is None and g.ttl is not None:
            age += f", TTL {format_age(g.ttl)}"
        if dry_run:
            out.write(f"would delete {_describe(dict(g.key()))}{at} (last push {age} ago)\n")
            continue
        outcome = delete_group(transport, g.key())
        if outcome.ok:
            out.write(f"deleted {_describe(dict(g.key()))}{at} (last push {age} ago)\n")
        else:
            failed += 1
            out.write(
                f"FAILED to delete {_describe(dict(g.key()))}{at}: "
                f"{outcome.error or outcome.status}\n"
            )
    return failed


def delete(config: Config, out: IO[str], *, labels: Mapping[str, str]) -> int:
    """Delete the one group whose grouping key is exactly ``labels``."""
    try:
        groups = _read(config, labels.get("job"))
    except GatewayError as exc:
        return _unreachable(config, exc)
    exact = [g for g in groups if g.labels == dict(labels)]
    if not exact:
        out.write(f"no group with exactly {_describe(labels)}: nothing deleted\n")

        # the job's groups that share the most of the given labels
        def shared(g: GroupInfo) -> int:
            return sum(g.labels.get(k) == v for k, v in labels.items())

        near = sorted(groups, key=shared, reverse=True)
        for g in near[:10]:
            out.write(f"  did you mean: {delete_command(g.labels)}\n")
        return 1
    failed = 0
    for url in config.urls:  # every copy: one left behind by a change to the list too
        transport: Transport = HttpTransport(config, url)
        try:
            outcome = delete_group(transport, exact[0].key())
        finally:
            transport.close()
        if not outcome.ok:
            failed += 1
            at = f" at {url}" if len(config.urls) > 1 else ""
            out.write(
                f"FAILED to delete {_describe(labels)}{at}: {outcome.error or outcome.status}\n"
            )
    if failed:
        return 1
    out.write(f"deleted {_describe(dict(exact[0].key()))}\n")
    return 0


def replay(config: Config, out: IO[str]) -> int:
    """Deliver the spool now (what the sender of any process does every 30 s)."""
    if not config.spool_dir:
        out.write("the spool is off (ORCHESTRATOR_PUSH_SPOOL_DIR=off): nothing to replay\n")
        return 0
    spool = Spool(config.spool_dir, config.spool_max_bytes)
    before = spool.pending()
    ledger = Ledger()
    transport = connect(config)
    try:
        empty = Replayer(config, spool, ledger).run_all(transport)
    finally:
        transport.close()
    stats = ledger.snapshot()
    left, others = spool.waiting(), spool.pending() - spool.waiting()
    out.write(
        f"{stats.replayed} records from {before - left - others} of {before} spool files "
        f"delivered to {config.url}; {left} left in {config.spool_dir}"
        + (f" ({others} being replayed by other processes)" if others else "")
        + "\n"
    )
    if stats.rejected:
        out.write(f"{stats.rejected} records refused by the gateway (see its log)\n")
    bad = spool.unreadable()
    if bad:
        out.write(
            f"{len(bad)} unreadable spool files set aside (removed after "
            f"{int(spool.bad_max_age // 86400)} days): {', '.join(bad)}\n"
        )
    return 0 if empty else 1


def _read(config: Config, job: str | None) -> list[GroupInfo]:
    """Every group (of ``job``) at the gateway(s): of a group on several, the
    copy pushed last."""
    transport = connect(config)
    try:
        groups = list_groups(transport, config.namespace)
        for url in transport.unreachable if isinstance(transport, Gateways) else []:
            print(
                f"orchestrator-push: cannot read the Pushgateway at {url}: "
                "the groups only it holds are not listed",
                file=sys.stderr,
            )
    finally:
        transport.close()
    return _filter(groups, job)


def _filter(groups: list[GroupInfo], job: str | None) -> list[GroupInfo]:
    if job is not None:
        groups = [g for g in groups if g.job == job]
    return sorted(
        groups,
        key=lambda g: (
            g.job,
            g.labels.get("flow", "\uffff"),
            g.labels.get("task", ""),
            sorted(g.labels.items()),
        ),
    )


def _unreachable(config: Config, exc: GatewayError) -> int:
    _unreachable_at(config.url, exc)
    return 1


def _unreachable_at(url: str, exc: GatewayError) -> None:
    print(f"orchestrator-push: cannot read the Pushgateway at {url}: {exc}", file=sys.stderr)


def delete_command(labels: Mapping[str, str]) -> str:
    """The ``delete`` command line for exactly this group."""
    import shlex

    args = ["orchestrator-push", "delete", "--job", labels.get("job", "")]
    for name in ("flow", "task"):
        if name in labels:
            args += [f"--{name}", labels[name]]
    for k, v in sorted(labels.items()):
        if k not in ("job", "flow", "task"):
            args += ["--label", f"{k}={v}"]
    return shlex.join(args)


def parse_label_args(values: Sequence[str]) -> dict[str, str]:
    """``k=v`` arguments; ValueError naming the bad one."""
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--label {item!r}: expected NAME=VALUE")
        out[name.strip()] = value
    return out
