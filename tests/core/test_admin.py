"""status, gc, delete and doctor against the real Pushgateway."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from gateway import Pushgateway, free_port, wait_until

import orchestrator_push as op
from orchestrator_push import admin, doctor
from orchestrator_push.cli import main
from orchestrator_push.groups import format_age, parse_duration, parse_groups
from orchestrator_push.records import FlowRecord, TaskRecord

NS = "orchestrator"
NOW = time.time()


def seed(gw: Pushgateway) -> None:
    """Groups of three kinds: our tasks and flow, Celery-style counters, another tool's."""
    e = op.Engine(op.load_config({}, url=gw.url, interval=0.05))
    try:
        e.record_task(TaskRecord("airflow", "etl", "extract", "success", NOW - 100, 1.5))
        e.record_task(TaskRecord("airflow", "etl", "load", "success", NOW - 300, 2.0))
        e.record_task(TaskRecord("airflow", "etl", "load", "failed", NOW - 50, 4.0, attempt=2))
        e.record_flow(FlowRecord("airflow", "etl", "failed", NOW - 40, 60.0))
        e.record_task(TaskRecord("celery", "tasks", "tasks.add", "success", NOW - 10, 0.1),
                      cumulative={"instance": "w1@host"})
        e.record_task(TaskRecord("exec", "odd / name", "main", "success", NOW - 5, 0.2))
        assert e.flush(10)
    finally:
        e.close(0)
    req = urllib.request.Request(gw.url + "/metrics/job/other_tool/instance/x",
                                 data=b"other_metric 1\n", method="PUT")
    urllib.request.urlopen(req, timeout=5).close()


def config(gw: Pushgateway) -> op.Config:
    return op.load_config({}, url=gw.url)


def labelsets(gw: Pushgateway) -> list[dict[str, str]]:
    return sorted((g.labels for g in gw.groups()), key=lambda d: sorted(d.items()))


def settles_to(gw: Pushgateway, expected: list[dict[str, str]]) -> bool:
    """The gateway deletes asynchronously (it answers DELETE with 202): poll."""
    wait_until(lambda: labelsets(gw) == expected, 10, what=f"groups {expected}")
    return True


def test_status_json_reads_back_every_group(pushgateway: Pushgateway) -> None:
    seed(pushgateway)
    out = io.StringIO()
    assert admin.status(config(pushgateway), out, as_json=True) == 0
    rows = {(r["job"], r["flow"], r["task"]): r for r in json.loads(out.getvalue())}
    assert set(rows) == {("airflow", "etl", "extract"), ("airflow", "etl", "load"),
                         ("airflow", "etl", None), ("celery", None, None),
                         ("celery", "tasks", "tasks.add"),
                         ("exec", "odd / name", "main"), ("other_tool", None, None)}
    load = rows[("airflow", "etl", "load")]
    assert (load["status"], load["framework"], load["kind"]) == ("failed", "airflow", "task")
    assert load["last_success_timestamp"] == pytest.approx(NOW - 300)
    assert load["last_failure_timestamp"] == pytest.approx(NOW - 50)
    assert load["duration_seconds"] == 4.0
    assert abs(load["push_time"] - time.time()) < 60 and not load["stale"]
    assert rows[("airflow", "etl", None)]["kind"] == "flow"
    assert rows[("airflow", "etl", None)]["status"] == "failed"
    assert rows[("celery", None, None)]["kind"] == "counters"
    assert rows[("celery", None, None)]["labels"] == {"job": "celery", "instance": "w1@host"}
    assert rows[("other_tool", None, None)]["kind"] is None


def test_status_table_marks_failures_and_stale_groups(pushgateway: Pushgateway,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    seed(pushgateway)
    out = io.StringIO()
    assert admin.status(config(pushgateway), out, job="airflow", now=time.time() + 2 * 86400) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["JOB", "FLOW", "TASK", "STATUS"]
    assert len(lines) == 4  # header, the flow, two tasks: only job airflow
    load = next(line for line in lines if " load " in line)
    assert "failed" in load and "stale" in load and "\033[" not in load  # no colour: not a tty
    # the command line, with the default 1d staleness: fresh groups are not stale
    assert main(["status", "--url", pushgateway.url]) == 0
    table = capsys.readouterr().out
    assert "odd / name" in table and "w1@host" in table and "stale" not in table


def test_status_unreachable_gateway_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot read the Pushgateway" in capsys.readouterr().err


def test_gc_deletes_only_what_is_older_and_matches(pushgateway: Pushgateway) -> None:
    seed(pushgateway)
    before = labelsets(pushgateway)
    later = time.time() + 3600
    out = io.StringIO()
    assert admin.gc(config(pushgateway), out, older_than=1800, job="airflow", dry_run=True,
                    now=later) == 0
    assert out.getvalue().count("would delete") == 3
    assert labelsets(pushgateway) == before  # dry run: nothing deleted
    out = io.StringIO()
    assert admin.gc(config(pushgateway), out, older_than=1800, job="airflow", now=later) == 0
    assert out.getvalue().count("deleted job=airflow") == 3
    assert settles_to(pushgateway, [g for g in before if g["job"] != "airflow"])
    out = io.StringIO()  # everything is fresh for a 2-hour threshold
    assert admin.gc(config(pushgateway), out, older_than=7200, now=later) == 0
    assert "nothing to delete" in out.getvalue()
    assert len(labelsets(pushgateway)) == 4
    assert admin.gc(config(pushgateway), io.StringIO(), older_than=60, now=later) == 0
    assert settles_to(pushgateway, [])  # odd / name (base64 in the URL) too


def test_gc_from_the_command_line_keeps_fresh_groups(pushgateway: Pushgateway,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    seed(pushgateway)
    before = labelsets(pushgateway)
    assert main(["gc", "--url", pushgateway.url, "--older-than", "1d"]) == 0
    assert "nothing to delete" in capsys.readouterr().out
    assert labelsets(pushgateway) == before


def test_delete_exactly_one_group(pushgateway: Pushgateway,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    seed(pushgateway)
    before = labelsets(pushgateway)
    # not exact: nothing deleted, the exact commands suggested
    assert main(["delete", "--url", pushgateway.url, "--job", "airflow", "--flow", "etl",
                 "--task", "nope"]) == 1
    out = capsys.readouterr().out
    assert "nothing deleted" in out
    assert "orchestrator-push delete --job airflow --flow etl --task load" in out
    assert labelsets(pushgateway) == before
    assert main(["delete", "--url", pushgateway.url, "--job", "exec",
                 "--flow", "odd / name", "--task", "main"]) == 0
    assert main(["delete", "--url", pushgateway.url, "--job", "celery",
                 "--label", "instance=w1@host"]) == 0
    assert main(["delete", "--url", pushgateway.url, "--job", "airflow", "--flow", "etl"]) == 0
    assert settles_to(pushgateway, [g for g in before if g not in (
        {"job": "exec", "flow": "odd / name", "task": "main"},
        {"job": "celery", "instance": "w1@host"}, {"job": "airflow", "flow": "etl"})])


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["gc", "--older-than", "7x"], ["gc", "--older-than"], ["delete", "--job", "j", "--label", "x"],
                 ["status", "--stale", "soon"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    assert "7d, 12h" in capsys.readouterr().err


def test_bad_configuration_exits_2_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ORCHESTRATOR_PUSH_TIMEOUT", "soon")
    assert main(["status"]) == 2
    assert "ORCHESTRATOR_PUSH_TIMEOUT" in capsys.readouterr().err


def test_every_command_has_help_with_examples() -> None:
    for cmd in ("status", "gc", "delete", "doctor", "replay", "exec"):
        p = subprocess.run([sys.executable, "-m", "orchestrator_push", cmd, "--help"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "examples:" in p.stdout and "exit codes" in p.stdout, cmd


def test_doctor_passes_against_a_working_gateway(pushgateway: Pushgateway) -> None:
    out = io.StringIO()
    assert doctor.run(out, {"ORCHESTRATOR_PUSH_URL": pushgateway.url}) == 0
    text = out.getvalue()
    assert "Pushgateway 1." in text and "pushed and deleted" in text
    assert "all checks passed" in text
    assert settles_to(pushgateway, [])  # the probe group is gone


def test_doctor_reports_what_waits_in_the_spool(pushgateway: Pushgateway,
                                                tmp_path: object) -> None:
    spool = str(tmp_path)
    env = {"ORCHESTRATOR_PUSH_URL": pushgateway.url, "ORCHESTRATOR_PUSH_SPOOL_DIR": spool}
    out = io.StringIO()
    assert doctor.run(out, env) == 0
    assert f"[  ok] spool: empty ({spool})" in out.getvalue()
    e = op.Engine(op.load_config({}, url=f"http://127.0.0.1:{free_port()}", spool_dir=spool,
                                 timeout=0.3))
    e.record_task(TaskRecord("exec", "f", "t", "success", 1.0, 1.0))
    assert e.close(0.5)  # spooled
    out = io.StringIO()
    assert doctor.run(out, env) == 0  # a warning, not a failure
    assert "[warn] spool: 1 file(s)" in out.getvalue()
    out = io.StringIO()
    assert doctor.run(out, {**env, "ORCHESTRATOR_PUSH_SPOOL_DIR": "off"}) == 0
    assert "[warn] spool: off" in out.getvalue()


def test_replay_command_delivers_the_spool(pushgateway: Pushgateway, tmp_path: object,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spool = str(tmp_path)
    down = f"http://127.0.0.1:{free_port()}"
    for i in range(3):  # three processes that could not deliver
        e = op.Engine(op.load_config({}, url=down, spool_dir=spool, timeout=0.3))
        e.record_task(TaskRecord("exec", "f", f"t{i}", "success", 1.0 + i, 1.0))
        assert e.close(0.5)
    assert len(os.listdir(spool)) == 3
    monkeypatch.setenv("ORCHESTRATOR_PUSH_SPOOL_DIR", spool)
    assert main(["replay", "--url", down]) == 1  # still unreachable: kept
    assert "0 records from 0 of 3 spool files" in capsys.readouterr().out
    assert len(os.listdir(spool)) == 3
    assert main(["replay", "--url", pushgateway.url]) == 0
    assert "3 records from 3 of 3 spool files" in capsys.readouterr().out
    assert os.listdir(spool) == []
    assert {g.labels["task"] for g in pushgateway.groups()} == {"t0", "t1", "t2"}


def test_doctor_explains_an_unreachable_gateway_and_bad_config() -> None:
    out = io.StringIO()
    assert doctor.run(out, {"ORCHESTRATOR_PUSH_URL": f"http://127.0.0.1:{free_port()}"}) == 1
    assert "connection refused" in out.getvalue() and "fix: start the Pushgateway" in out.getvalue()
    out = io.StringIO()
    assert doctor.run(out, {"ORCHESTRATOR_PUSH_INTERVAL": "-1"}) == 1
    assert "[FAIL] configuration: ORCHESTRATOR_PUSH_INTERVAL" in out.getvalue()
    assert "fix: fix ORCHESTRATOR_PUSH_INTERVAL" in out.getvalue()


def test_doctor_reports_a_refused_push(pushgateway: Pushgateway) -> None:
    # another group holds the probe's metric name with another type: the gateway says 400
    req = urllib.request.Request(pushgateway.url + "/metrics/job/seed",
                                 data=b"# TYPE orchestrator_doctor_probe_timestamp_seconds counter\n"
                                      b"orchestrator_doctor_probe_timestamp_seconds 1\n",
                                 method="PUT")
    urllib.request.urlopen(req, timeout=5).close()
    out = io.StringIO()
    assert doctor.run(out, {"ORCHESTRATOR_PUSH_URL": pushgateway.url}) == 1
    assert "[FAIL] push a probe group: HTTP 400" in out.getvalue()


def test_parse_groups_notices_failing_pushes() -> None:
    [g] = parse_groups([{"labels": {"job": "j"},
                         "push_time_seconds": {"metrics": [{"value": "100"}]},
                         "push_failure_time_seconds": {"metrics": [{"value": "200"}]}}], NS)
    row = admin._row(g, now=300, stale_after=86400)
    assert row["push_failing"] and not row["stale"] and row["kind"] is None


@pytest.mark.parametrize("text,seconds", [("7d", 604800), ("12h", 43200), ("1h30m", 5400),
                                          ("90s", 90), ("2w", 1209600), ("0.5h", 1800)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-1d", "0s", "1d 2h", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_age() -> None:
    assert [format_age(x) for x in (None, 5, 125, 7300, 200000)] == ["-", "5s", "2m", "2h", "2d"]


def test_status_shows_a_run_in_progress_with_its_age(pushgateway: Pushgateway) -> None:
    e = op.Engine(op.load_config({}, url=pushgateway.url, interval=0.05))
    try:
        e.record_start("exec", "backup", "dump", at=NOW - 600, timeout=3600)  # never ran before
        e.record_task(TaskRecord("exec", "backup", "upload", "success", NOW - 700, 10.0))
        e.record_start("exec", "backup", "upload", at=NOW - 120)  # its second run
        e.record_start("exec", "backup", "check", at=NOW - 900)
        e.record_task(TaskRecord("exec", "backup", "check", "failed", NOW - 890, 10.0))
        assert e.flush(10)
    finally:
        e.close(0)
    out = io.StringIO()
    assert admin.status(config(pushgateway), out, as_json=True, now=NOW) == 0
    rows = {r["task"]: r for r in json.loads(out.getvalue())}
    dump, upload, check = rows["dump"], rows["upload"], rows["check"]
    assert (dump["kind"], dump["framework"], dump["in_progress"]) == ("task", "exec", True)
    assert dump["running_for_seconds"] == pytest.approx(600)
    assert dump["timeout_seconds"] == 3600 and dump["status"] is None
    assert upload["in_progress"] and upload["status"] == "success"  # the previous outcome
    assert upload["running_for_seconds"] == pytest.approx(120)
    assert not check["in_progress"] and check["running_for_seconds"] is None
    table = io.StringIO()
    assert admin.status(config(pushgateway), table, now=NOW) == 0
    lines = {line.split()[2]: line for line in table.getvalue().splitlines()[1:]}
    assert "running 10m" in lines["dump"] and "running 2m" in lines["upload"]
    assert "failed" in lines["check"]


def test_status_adds_up_each_tasks_runs_over_every_counters_group(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    """Runs and failures per task and flow: the host store's counts (real exec
    processes) and two worker nodes' counters groups, added up per job."""
    from test_host_counts import run_exec

    spool = os.path.join(str(tmp_path), "spool")
    for code in (0, 2, 0):
        assert run_exec(pushgateway.url, spool, code, job="nightly").returncode == code
    e = op.Engine(op.load_config({}, url=pushgateway.url, interval=0.05, spool_dir="off"))
    try:
        for node, statuses in (("w1@a", ["success", "failed", "retry"]), ("w2@b", ["success"])):
            for status in statuses:
                e.record_task(TaskRecord("celery", "shop", "shop.charge", status, NOW, 0.1),
                              cumulative={"instance": node})
        e.record_task(TaskRecord("celery", "shop", "shop.ship", "success", NOW, 0.1))  # uncounted
        assert e.flush(10)
    finally:
        e.close(0)
    # a scheduler's flow runs, counted in its host's store
    f = op.Engine(op.load_config({}, url=pushgateway.url, job="airflow", interval=0.05,
                                 spool_dir=os.path.join(str(tmp_path), "spool2")))
    try:
        for status, end in (("success", NOW - 10), ("failed", NOW)):
            run = FlowRecord("airflow", "etl", status, end, 5.0)
            f.record_flow(run)
            f.count(run)
        assert f.flush(10)
    finally:
        f.close(0)
    out = io.StringIO()
    assert admin.status(config(pushgateway), out, as_json=True) == 0
    rows = {(r["job"], r["task"]): r for r in json.loads(out.getvalue()) if r["kind"] == "task"}
    nightly, charge, ship = rows[("nightly", "main")], rows[("celery", "shop.charge")], \
        rows[("celery", "shop.ship")]
    assert (nightly["runs_total"], nightly["failures_total"]) == (3, 1)
    assert nightly["runs_by_status"] == {"failed": 1, "success": 2}
    assert (charge["runs_total"], charge["failures_total"]) == (4, 1)  # a retry is no failure
    assert charge["runs_by_status"] == {"failed": 1, "retry": 1, "success": 2}
    assert ship["runs_total"] is None and ship["runs_by_status"] is None
    [etl] = [r for r in json.loads(out.getvalue()) if r["kind"] == "flow"]
    assert (etl["job"], etl["runs_total"], etl["failures_total"]) == ("airflow", 2, 1)
    table = io.StringIO()
    assert admin.status(config(pushgateway), table, job="celery") == 0
    header, *lines = table.getvalue().splitlines()
    assert header.split()[:8] == ["JOB", "FLOW", "TASK", "STATUS", "LAST", "SUCCESS", "LAST",
                                  "FAILURE"] and "RUNS" in header.split()
    charge_line = next(line for line in lines if " shop.charge " in line)
    assert "4 (1 failed)" in charge_line
