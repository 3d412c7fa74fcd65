"""Schedules and expiry: `exec --schedule/--every` as a user runs it, a paused
schedule, the group TTL, and `gc` / `status` by TTL, on a real gateway."""

from __future__ import annotations

import calendar
import json
import subprocess
import time
import urllib.request
from collections.abc import Collection
from datetime import datetime, timezone

import pytest
from gateway import Pushgateway, wait_until
from test_exec import cli, run

from orchestrator_push.config import ConfigError, load_config
from orchestrator_push.engine import Engine
from orchestrator_push.schedule_watch import Due, Key, Poller, ScheduleRecorder
from orchestrator_push.schedules import parse_cron

NS = "orchestrator"
WEEK = 7 * 86400.0


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()  # type: ignore[misc]


# -- the cron arithmetic (pure functions) ----------------------------------------------


def test_a_tick_in_the_hour_skipped_by_daylight_saving_runs_at_the_first_minute_after_it() -> None:
    c = parse_cron("30 2 * * *", "Europe/Berlin")
    due = c.after(utc(2026, 3, 28, 12))
    assert due == utc(2026, 3, 29, 1, 0)  # 03:00 CEST: 02:30 does not exist that night
    assert c.period(utc(2026, 3, 28, 12)) == 23.5 * 3600  # 03:00, then 02:30 the next day
    assert c.at_or_before(due) == due  # a run started at its tick is 0 s late
    assert c.at_or_before(due - 1) == utc(2026, 3, 28, 1, 30)


def test_a_tick_in_the_hour_repeated_by_daylight_saving_runs_once() -> None:
    c = parse_cron("30 2 * * *", "Europe/Berlin")
    first = c.after(utc(2026, 10, 24, 12))
    assert first == utc(2026, 10, 25, 0, 30)  # 02:30 CEST, the first of the two
    assert c.after(first) == utc(2026, 10, 26, 1, 30)  # not 02:30 CET an hour later
    assert c.period(utc(2026, 10, 24, 12)) == 25 * 3600


def test_bad_schedules_and_zones_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not a cron schedule"):
        parse_cron("61 * * * *", "UTC")
    with pytest.raises(ValueError, match="not a cron schedule"):
        parse_cron("0 0 30 2 *", "UTC")  # 30 February: never due
    with pytest.raises(ValueError, match="not a time zone name"):
        parse_cron("* * * * *", "Mars/Olympus")


def test_the_group_ttl_setting_takes_seconds_or_a_duration_and_names_the_variable() -> None:
    assert load_config({"ORCHESTRATOR_PUSH_GROUP_TTL": "3d"}).group_ttl == 3 * 86400
    assert load_config({"ORCHESTRATOR_PUSH_GROUP_TTL": "90"}).group_ttl == 90
    assert load_config({}).group_ttl is None
    for bad in ("0", "-5", "soon", "inf"):
        with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_GROUP_TTL"):
            load_config({"ORCHESTRATOR_PUSH_GROUP_TTL": bad})
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_GROUP_TTL"):
        load_config({}, group_ttl=0)


# -- exec ---------------------------------------------------------------------------------


def test_exec_with_a_cron_schedule_pushes_the_next_tick_its_grace_and_how_late_it_started(
    pushgateway: Pushgateway,
) -> None:
    p = run(["exec", "--job", "backup", "--schedule", "*/5 * * * *", "--tz", "UTC",
             "--grace", "2m", "--", "true"], pushgateway.url)
    assert p.returncode == 0, p.stderr
    g = pushgateway.group(job="backup", flow="backup", task="main")
    start = g.value(f"{NS}_task_last_start_timestamp_seconds")
    tick = start - start % 300
    assert g.value(f"{NS}_task_next_run_timestamp_seconds", framework="exec") == tick + 300
    assert g.value(f"{NS}_task_schedule_grace_seconds") == 120
    assert g.value(f"{NS}_flow_last_start_delay_seconds") == pytest.approx(start - tick, abs=1e-6)
    assert g.value(f"{NS}_push_group_ttl_seconds") == WEEK  # 3 periods are less than a week
    assert g.value(f"{NS}_task_last_status", status="success") == 1


def test_a_monthly_schedule_keeps_its_group_for_three_months(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "invoices", "--schedule", "0 6 1 * *", "--tz", "UTC", "--",
             "true"], pushgateway.url)
    assert p.returncode == 0, p.stderr
    g = pushgateway.group(job="invoices", flow="invoices", task="main")
    due = g.value(f"{NS}_task_next_run_timestamp_seconds")
    month = datetime.fromtimestamp(due, timezone.utc)
    days = calendar.monthrange(month.year, month.month)[1]  # the month after the next tick
    assert month.day == 1 and month.hour == 6
    assert g.value(f"{NS}_task_schedule_grace_seconds") == 300  # the default
    assert g.value(f"{NS}_push_group_ttl_seconds") == 3 * days * 86400 + 300


def test_exec_every_pushes_the_next_run_one_period_after_this_one_ended(
    pushgateway: Pushgateway,
) -> None:
    p = run(["exec", "--job", "loop", "--every", "10s", "--grace", "3s", "--", "true"],
            pushgateway.url)
    assert p.returncode == 0, p.stderr
    g = pushgateway.group(job="loop", flow="loop", task="main")
    ended = g.value(f"{NS}_task_last_completion_timestamp_seconds")
    assert g.value(f"{NS}_task_next_run_timestamp_seconds") == ended + 10
    assert g.value(f"{NS}_task_schedule_grace_seconds") == 3
    assert f"{NS}_flow_last_start_delay_seconds" not in g.metrics  # no tick to be late for


def test_the_ttl_setting_wins_over_the_schedule(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "invoices", "--schedule", "0 6 1 * *", "--", "true"],
            pushgateway.url, env={"ORCHESTRATOR_PUSH_GROUP_TTL": "2d"})
    assert p.returncode == 0, p.stderr
    for labels in ({"flow": "invoices", "task": "main"}, {"instance": ""}):
        groups = [g for g in pushgateway.groups() if g.labels.get("job") == "invoices"
                  and all(g.labels.get(k, "") == v for k, v in labels.items() if v)]
        assert groups and all(g.value(f"{NS}_push_group_ttl_seconds") == 2 * 86400
                              for g in groups)


@pytest.mark.parametrize("args, message", [
    (["--tz", "UTC"], "--tz needs --schedule"),
    (["--grace", "1m"], "--grace needs --schedule or --every"),
    (["--schedule", "* * *"], "--schedule/--tz: '* * *' is not a cron schedule"),
    (["--schedule", "* * * * *", "--every", "1m"], "not allowed with argument"),
])
def test_exec_refuses_bad_schedule_options_before_running_the_command(
    pushgateway: Pushgateway, args: list[str], message: str
) -> None:
    p = run(["exec", "--job", "j", *args, "--", "touch", "/nonexistent/ran"], pushgateway.url)
    assert p.returncode == 2 and message in p.stderr
    assert pushgateway.groups() == []


# -- a paused schedule ------------------------------------------------------------------


def scraped(gw: Pushgateway, name: str) -> list[str]:
    """What Prometheus would scrape of ``name``: the gateway's /metrics lines."""
    return [line for line in gw.get("/metrics").decode().splitlines()
            if line.startswith(name + "{")]


def test_a_paused_schedule_removes_the_next_run_and_keeps_the_grace(
    pushgateway: Pushgateway,
) -> None:
    engine = Engine(load_config({"ORCHESTRATOR_PUSH_URL": pushgateway.url}, spool_dir="off"))
    try:
        engine.record_start("airflow", "nightly", at=1000.0)
        engine.record_schedule("airflow", "nightly", next_run=2000.0, grace=60, interval=86400)
        assert engine.flush(10)
        g = pushgateway.group(job="airflow", flow="nightly")
        assert g.value(f"{NS}_flow_next_run_timestamp_seconds", framework="airflow") == 2000
        assert g.value(f"{NS}_push_group_ttl_seconds") == WEEK

        engine.record_schedule("airflow", "nightly", next_run=None, grace=60)
        assert engine.flush(10)
        assert scraped(pushgateway, f"{NS}_flow_next_run_timestamp_seconds") == []
        g = pushgateway.group(job="airflow", flow="nightly")
        assert g.metrics.get(f"{NS}_flow_next_run_timestamp_seconds", []) == []
        assert g.value(f"{NS}_flow_schedule_grace_seconds") == 60
        assert g.value(f"{NS}_flow_last_start_timestamp_seconds") == 1000  # the rest stays

        engine.record_schedule("airflow", "nightly", next_run=3000.0, grace=60)  # resumed
        assert engine.flush(10)
        assert len(scraped(pushgateway, f"{NS}_flow_next_run_timestamp_seconds")) == 1
        g = pushgateway.group(job="airflow", flow="nightly")
        assert g.value(f"{NS}_flow_next_run_timestamp_seconds") == 3000
    finally:
        engine.close(5)


def test_beat_entries_are_one_series_each(pushgateway: Pushgateway) -> None:
    engine = Engine(load_config({"ORCHESTRATOR_PUSH_URL": pushgateway.url}, spool_dir="off"))
    try:
        engine.record_schedule("celery", "proj", "proj.report",
                               next_run={"hourly": 100.0, "daily": 200.0}, grace=30)
        assert engine.flush(10)
        g = pushgateway.group(job="celery", flow="proj", task="proj.report")
        name = f"{NS}_task_next_run_timestamp_seconds"
        assert sorted((lab["schedule"], v) for lab, v in g.metrics[name]) == [
            ("daily", 200.0), ("hourly", 100.0)]
        assert g.value(f"{NS}_task_schedule_grace_seconds", schedule="daily") == 30
    finally:
        engine.close(5)


# -- gc and status by TTL -----------------------------------------------------------------


def admin(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli(), *args, "--url", url], capture_output=True, text=True,
                          timeout=60)


def push_time(gw: Pushgateway, job: str) -> float:
    data = json.loads(gw.get("/api/v1/metrics"))["data"]
    (entry,) = [e for e in data if e["labels"].get("job") == job and "task" in e["labels"]]
    return float(entry["push_time_seconds"]["metrics"][0]["value"])


def test_gc_without_an_age_deletes_exactly_the_groups_past_their_own_ttl(
    pushgateway: Pushgateway,
) -> None:
    short = run(["exec", "--job", "short", "--", "true"], pushgateway.url,
                env={"ORCHESTRATOR_PUSH_GROUP_TTL": "1s"})
    week = run(["exec", "--job", "week", "--", "true"], pushgateway.url)
    assert short.returncode == week.returncode == 0
    req = urllib.request.Request(pushgateway.url + "/metrics/job/other", method="POST",
                                 data=b"other_tool_metric 1\n")  # declares no TTL
    urllib.request.urlopen(req, timeout=5).close()
    pushed = push_time(pushgateway, "short")
    wait_until(lambda: time.time() > pushed + 1.5, 5, what="the short TTL to pass")

    dry = admin(["gc", "--dry-run"], pushgateway.url)
    assert dry.returncode == 0, dry.stderr
    would = [line for line in dry.stdout.splitlines() if line.startswith("would delete")]
    # the task group and the host's counters group of job short, both with TTL 1s
    assert len(would) == 2 and all("job=short" in line and "TTL 1s" in line for line in would)
    assert "kept 1 group(s) that declare no TTL" in dry.stdout

    status = admin(["status", "--json"], pushgateway.url)
    rows = {(r["job"], r["task"]): r for r in json.loads(status.stdout)}
    assert rows[("short", "main")]["ttl_seconds"] == 1
    assert rows[("short", "main")]["expires_at"] == pytest.approx(pushed + 1, abs=1e-3)
    assert rows[("week", "main")]["ttl_seconds"] == WEEK
    assert rows[("other", None)]["expires_at"] is None

    done = admin(["gc"], pushgateway.url)
    assert done.returncode == 0, done.stderr
    assert sorted(g.labels["job"] for g in pushgateway.groups()) == ["other", "week", "week"]


def test_status_shows_the_next_run_and_the_expiry(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "backup", "--schedule", "0 3 * * *", "--tz", "UTC", "--", "true"],
            pushgateway.url)
    assert p.returncode == 0, p.stderr
    out = admin(["status", "--job", "backup"], pushgateway.url)
    header, *lines = out.stdout.splitlines()
    assert "NEXT RUN" in header and "EXPIRES" in header
    (row,) = [line for line in lines if " main " in line]
    now = time.time()
    due = now - now % 86400 + 3 * 3600
    due = due if due > now else due + 86400
    hours = int((due - now) // 3600)
    assert (f"in {hours}h" if hours else "in ") in row and "in 6d" in row
    rows = json.loads(admin(["status", "--json", "--job", "backup"], pushgateway.url).stdout)
    (task,) = [r for r in rows if r["task"] == "main"]
    assert task["next_run_timestamp"] == due and task["schedule_grace_seconds"] == 300


def test_a_woken_poller_reads_that_schedule_at_once_not_at_its_next_poll(
        pushgateway: Pushgateway) -> None:
    """A scheduler wakes its schedule reader when a run starts: that DAG's next
    run is read alone, and reaches the gateway with the start, not a poll later."""
    engine = Engine(load_config({"ORCHESTRATOR_PUSH_URL": pushgateway.url,
                                 "ORCHESTRATOR_PUSH_INTERVAL": "0.1"}, spool_dir="off"))
    now: dict[Key, Due] = {("nightly", None): Due(2000.0, period=60.0),
                           ("hourly", None): Due(5000.0, period=3600.0)}
    reads: list[list[Key] | None] = []

    def read(keys: Collection[Key] | None) -> dict[Key, Due]:
        reads.append(None if keys is None else sorted(keys, key=str))
        return {k: v for k, v in now.items() if keys is None or k in keys}

    poller = Poller(ScheduleRecorder(engine, "airflow"), read, poll=3600.0, name="test-poller")
    poller.start()
    try:
        wait_until(lambda: pushgateway.next_run("airflow", "nightly")[0] == 2000.0, 10,
                   what="the first read at the gateway")
        now[("nightly", None)] = Due(2060.0, period=60.0)
        poller.wake(("nightly", None))
        wait_until(lambda: pushgateway.next_run("airflow", "nightly")[0] == 2060.0, 10,
                   what="the woken read at the gateway")
        assert reads == [None, [("nightly", None)]]
        # the schedules not read again stay as they were
        assert pushgateway.next_run("airflow", "hourly")[0] == 5000.0
    finally:
        poller.stop()
        engine.close(5)
