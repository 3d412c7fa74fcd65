"""End to end: the three framework examples and exec jobs, a real Pushgateway, a
real Prometheus (1 s scrape, deploy/prometheus rules loaded), and every PromQL
expression of the alert rules and of the Grafana dashboard asked of it.

The examples run exactly as `make demo` runs them (scripts/story.py), each
framework in its own virtualenv under .envs/.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from gateway import Prometheus, Pushgateway, running, wait_until

from orchestrator_push import doctor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import story  # noqa: E402

DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "orchestrator-push.json")

TASKS = {  # (framework, flow, task): last status, as the examples are written
    ("exec", "nightly", "dump"): "success",
    ("exec", "nightly", "upload"): "failed",
    ("celery", "shop", "shop.charge"): "success",
    ("celery", "shop", "shop.ship"): "success",
    ("celery", "shop", "shop.refund"): "failed",
    ("airflow", "example_etl", "extract"): "success",
    ("airflow", "example_etl", "load"): "success",
    ("airflow", "example_etl", "report"): "failed",
    ("prefect", "daily-etl", "extract"): "success",
    ("prefect", "daily-etl", "transform"): "success",
    ("prefect", "daily-etl", "load"): "success",
}
FLOWS = {("airflow", "example_etl"): "failed", ("prefect", "daily-etl"): "success"}
FAILED_TASKS = {k for k, v in TASKS.items() if v == "failed"}
SUCCEEDED_TASKS = {k for k, v in TASKS.items() if v == "success"}


def put(gw: Pushgateway, path: str, body: bytes) -> int:
    req = urllib.request.Request(gw.url + path, data=body, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def gw() -> Iterator[Pushgateway]:
    yield from running()


@pytest.fixture(scope="module")
def prom(gw: Pushgateway) -> Iterator[Prometheus]:
    p = Prometheus(gw.url, [*story.RULE_FILES, SHORT_LIMITS])
    try:
        story.run_examples(gw, say=lambda text: print(text, flush=True))
        # A group whose last push the gateway refused (a type conflicting with
        # another group's): what PushgatewayPushFailing is for.
        assert put(gw, "/metrics/job/seed_a", b"# TYPE e2e_shared gauge\ne2e_shared 1\n") == 200
        assert put(gw, "/metrics/job/seed_b", b"e2e_other 1\n") == 200
        assert put(gw, "/metrics/job/seed_b",
                   b"# TYPE e2e_shared counter\ne2e_shared_total 1\ne2e_shared 2\n") == 400
        wait_until(lambda: story.scraped(p), timeout=60, interval=0.5, what="the scrape")
        yield p
    finally:
        p.stop()


SHORT_LIMITS = os.path.join(os.path.dirname(__file__), "short_limits.yml")


def tuples(result: list[dict[str, Any]], *labels: str) -> set[tuple[str, ...]]:
    return {tuple(r["metric"].get(name, "") for name in labels) for r in result}


def rules(prom: Prometheus) -> dict[str, dict[str, Any]]:
    groups = prom.rule_groups()
    return {rule["name"] + ("" if rule["type"] == "alerting" else f"/{i}"): rule
            for g in groups for i, rule in enumerate(g["rules"])}


def firing(prom: Prometheus, alert: str, *labels: str) -> set[tuple[str, ...]]:
    return {tuple(a["labels"].get(name, "") for name in labels)
            for a in rules(prom)[alert]["alerts"] if a["state"] == "firing"}


def test_every_framework_and_job_label_reaches_prometheus(prom: Prometheus) -> None:
    result = prom.query("max by (job, framework, flow, task, status) "
                        "(orchestrator_task_last_status) == 1")
    assert {(f, fl, t): s for (f, fl, t, s) in
            tuples(result, "framework", "flow", "task", "status")} == TASKS
    # honor_labels: the pushed job label is kept, none renamed exported_job
    assert tuples(result, "job") == {("backup",), ("celery",), ("airflow",), ("prefect",)}
    assert prom.query("count(push_time_seconds{exported_job!=''})") == []


def test_every_rule_evaluates_without_error(prom: Prometheus) -> None:
    all_rules = wait_until(lambda: (r := rules(prom)) and all(
        x.get("lastEvaluation", "").startswith("2") and x["health"] != "unknown"
        for x in r.values()) and r, timeout=30, what="a rule evaluation")
    assert len(all_rules) == 38  # rules.yml, thresholds.yml, short_limits.yml
    assert {n: r["health"] for n, r in all_rules.items()} == {n: "ok" for n in all_rules}


def test_failed_alerts_fire_for_exactly_the_failed_runs(prom: Prometheus) -> None:
    def task_alerts() -> set[tuple[str, ...]]:
        return firing(prom, "OrchestratorTaskFailed", "framework", "flow", "task")
    assert wait_until(lambda: task_alerts() == FAILED_TASKS, timeout=30, what="TaskFailed")
    assert wait_until(lambda: firing(prom, "OrchestratorFlowFailed", "framework", "flow")
                      == {("airflow", "example_etl")}, timeout=30, what="FlowFailed")


def test_no_recent_success_rules(prom: Prometheus) -> None:
    r = rules(prom)
    # everything succeeded seconds ago: nothing fires...
    assert r["OrchestratorFlowNoRecentSuccess"]["alerts"] == []
    assert r["OrchestratorTaskNoRecentSuccess"]["alerts"] == []
    # ...and with the default threshold at 0 s, the same expressions select
    # every flow and task that has succeeded, with their labels
    flow_expr = re.sub(r"26 \* 3600", "0", r["OrchestratorFlowNoRecentSuccess"]["query"])
    task_expr = re.sub(r"26 \* 3600", "0", r["OrchestratorTaskNoRecentSuccess"]["query"])
    assert flow_expr != r["OrchestratorFlowNoRecentSuccess"]["query"]
    assert tuples(prom.query(flow_expr), "framework", "flow") == {("prefect", "daily-etl")}
    assert tuples(prom.query(task_expr), "framework", "flow", "task") == SUCCEEDED_TASKS
    ages = [float(x["value"][1]) for x in prom.query(task_expr)]
    assert all(0 <= a < 900 for a in ages)


def test_push_failing_and_stale_group_rules(prom: Prometheus, gw: Pushgateway) -> None:
    assert wait_until(lambda: firing(prom, "PushgatewayPushFailing", "job") == {("seed_b",)},
                      timeout=30, what="PushFailing")
    r = rules(prom)
    assert r["PushgatewayGroupStale"]["alerts"] == []
    stale_expr = re.sub(r"7 \* 86400", "0", r["PushgatewayGroupStale"]["query"])
    assert stale_expr != r["PushgatewayGroupStale"]["query"]
    assert r["OrchestratorPushRecordsLost"]["alerts"] == []  # nothing was dropped
    lost_expr = r["OrchestratorPushRecordsLost"]["query"].replace("> 0", ">= 0")
    assert lost_expr != r["OrchestratorPushRecordsLost"]["query"]
    # every group a task runner or worker pushed carries the self-metrics
    assert {(f, fl, t) for f, fl, t in tuples(prom.query(lost_expr), "framework", "flow", "task")
            if t} == set(TASKS)
    every_group = {tuple(sorted(g.labels.items())) for g in gw.groups()}
    stale = prom.query(stale_expr)
    got = {tuple(sorted((k, v) for k, v in x["metric"].items() if v and k != "pushgateway"))
           for x in stale}
    assert got == every_group
    # each alert says which gateway holds the group (the scrape config's label)
    assert {x["metric"].get("pushgateway") for x in stale} == {f"127.0.0.1:{gw.port}"}


def panel_exprs() -> list[tuple[str, str]]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var in ("$job", "$framework", "$flow"):
                expr = expr.replace(var, ".*")
            out.append((panel["title"], expr.replace("$__rate_interval", "1m")))
    return out


def test_dashboard_variables_list_every_job_framework_and_flow(prom: Prometheus) -> None:
    with open(DASHBOARD) as f:
        variables = {v["name"]: v for v in json.load(f)["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    expected = {"job": {"backup", "celery", "airflow", "prefect"},
                "framework": {"exec", "celery", "airflow", "prefect"},
                "flow": {"nightly", "shop", "example_etl", "daily-etl"}}
    for name, values in expected.items():
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", variables[name]["definition"])
        assert m and m.group(2) == name
        selector = re.sub(r'\$\w+', ".*", m.group(1))
        url = (prom.url + f"/api/v1/label/{name}/values?"
               + urllib.parse.urlencode({"match[]": selector}))
        with urllib.request.urlopen(url, timeout=10) as r:
            assert set(json.loads(r.read())["data"]) == values, name


COUNTED_TASKS = {("celery", "shop.charge"), ("celery", "shop.ship"), ("celery", "shop.refund"),
                 ("exec", "dump"), ("exec", "upload"),
                 ("airflow", "extract"), ("airflow", "load"), ("airflow", "report"),
                 ("prefect", "extract"), ("prefect", "transform"), ("prefect", "load")}

EXPECTED_PANELS: dict[str, Any] = {
    "Failed tasks (last run)": lambda res: float(res[0]["value"][1]) == len(FAILED_TASKS),
    "Failed flows (last run)": lambda res: float(res[0]["value"][1]) == 1,
    "Groups with failing pushes": lambda res: float(res[0]["value"][1]) == 1,
    "Stale groups (no push for 7d)": lambda res: float(res[0]["value"][1]) == 0,
    "Records dropped by orchestrator-push": lambda res: float(res[0]["value"][1]) == 0,
    "Runs finished per minute (all frameworks' workers)": lambda res: len(res) == 1,
    "Last outcome per task": lambda res: {
        (f, fl, t): s for f, fl, t, s in tuples(res, "framework", "flow", "task", "status")} == TASKS,
    "Last outcome per flow": lambda res: {
        (f, fl): s for f, fl, s in tuples(res, "framework", "flow", "status")} == FLOWS,
    "Time since last success per task": lambda res:
        tuples(res, "framework", "flow", "task") == SUCCEEDED_TASKS,
    "Time since last success per flow": lambda res:
        tuples(res, "framework", "flow") == {("prefect", "daily-etl")},
    "Task duration (last attempt)": lambda res:
        tuples(res, "flow", "task") == {(fl, t) for _, fl, t in TASKS},
    "Flow duration (last run)": lambda res: tuples(res, "flow") == {("example_etl",), ("daily-etl",)},
    "Failures over time": lambda res: tuples(res, "framework", "flow") ==
        {(f, fl) for f, fl, _ in FAILED_TASKS},
    # no task's last attempt is a retry once the examples end
    "Retries over time": lambda res: res == [],
    # every framework counts: Celery per node, exec, Airflow and Prefect per host
    "Throughput by task and outcome": lambda res: tuples(res, "framework", "task", "status") == {
        ("celery", "shop.charge", "success"), ("celery", "shop.ship", "success"),
        ("celery", "shop.ship", "retry"), ("celery", "shop.refund", "failed"),
        ("exec", "dump", "success"), ("exec", "upload", "failed"),
        ("airflow", "extract", "retry"), ("airflow", "extract", "success"),
        ("airflow", "load", "success"), ("airflow", "report", "failed"),
        ("prefect", "extract", "retry"), ("prefect", "extract", "success"),
        ("prefect", "transform", "success"),
        ("prefect", "load", "success")},
    "p95 duration by task": lambda res: tuples(res, "framework", "task") == COUNTED_TASKS,
    # only tasks whose counters grew between two scrapes have a ratio (0 / 0 is none)
    "Failure ratio by task (last hour)": lambda res: tuples(res, "framework", "task") <=
        COUNTED_TASKS and all(0 <= float(r["value"][1]) <= 1 for r in res),
    # the example's worker shut down cleanly: up 0, so not down
    "Workers down (up, not seen for 2 min)": lambda res: float(res[0]["value"][1]) == 0,
    "Seconds since each worker was last seen": lambda res:
        tuples(res, "job", "framework", "role") == {("celery", "celery", "celery-worker")},
    "Celery tasks in progress by task": lambda res: {
        (r["metric"]["task"], float(r["value"][1])) for r in res} == {
        ("shop.charge", 0.0), ("shop.ship", 0.0), ("shop.refund", 0.0)},
    "Oldest attempt in progress per task (age)": lambda res: res == [],
    # every run of the demo finished
    "Tasks in progress now (age)": lambda res: res == [],
    "Flows in progress now (age)": lambda res: res == [],
    # Celery (instrumented publisher) and Prefect tasks know their queue wait
    "Task queue wait (last attempt)": lambda res: {("shop", "shop.charge"),
        ("daily-etl", "extract")} <= tuples(res, "flow", "task"),
    "Flow start delay (last run)": lambda res: ("daily-etl",) in tuples(res, "flow"),
    # send.py calls instrument(app): its messages carry the publish time
    "Celery p95 queue wait by task": lambda res:
        tuples(res, "task") == {("shop.charge",), ("shop.ship",), ("shop.refund",)},
}


@pytest.mark.parametrize("title,expr", panel_exprs(), ids=[t for t, _ in panel_exprs()])
def test_dashboard_panel_returns_the_expected_series(prom: Prometheus, title: str,
                                                     expr: str) -> None:
    check = EXPECTED_PANELS[title]
    wait_until(lambda: check(prom.query(expr)), timeout=30, interval=0.5,
               what=f"panel {title!r}: {expr}")


def test_doctor_sees_the_scrape_and_our_series(prom: Prometheus, gw: Pushgateway) -> None:
    out = io.StringIO()
    assert doctor.run(out, {"ORCHESTRATOR_PUSH_URL": gw.url}, prometheus=prom.url) == 0, \
        out.getvalue()
    assert "[  ok] honor_labels: true" in out.getvalue()
    assert "[  ok] orchestrator_* series in Prometheus" in out.getvalue()


def test_doctor_flags_a_scrape_without_honor_labels(prom: Prometheus, gw: Pushgateway) -> None:
    bad = Prometheus(gw.url, honor_labels=False)
    try:
        wait_until(lambda: bad.query("push_time_seconds"), timeout=30, what="a scrape")
        out = io.StringIO()
        assert doctor.run(out, {"ORCHESTRATOR_PUSH_URL": gw.url}, prometheus=bad.url) == 1
        text = out.getvalue()
        assert "[FAIL] honor_labels: true" in text and "fix: set honor_labels: true" in text
    finally:
        bad.stop()


def killed_exec(gw: Pushgateway, job: str, *args: str, until: Any) -> Any:
    """`exec --job JOB ARGS -- sleep 600`, SIGKILLed (as by an OOM kill) once
    ``until()`` is truthy; what it returned."""
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": gw.url, "ORCHESTRATOR_PUSH_INTERVAL": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator_push", "exec", "--job", job,
                             *args, "--", "sleep", "600"], env=env, start_new_session=True)
    try:
        found = wait_until(until, 60, interval=0.2, what=f"the run of {job} in progress")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return found
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_runs_in_progress_are_what_the_hung_and_vanished_rules_read(
        prom: Prometheus, gw: Pushgateway) -> None:
    # every run of the demo finished: its start and its completion are both there
    starts = prom.query('orchestrator_task_last_start_timestamp_seconds{framework="exec"}')
    assert tuples(starts, "flow", "task") == {("nightly", "dump"), ("nightly", "upload")}
    assert prom.query("orchestrator:task_in_progress_start_timestamp_seconds") == []
    # a run that does not finish (its process will be killed, as by an OOM kill)
    found = killed_exec(gw, "stuck", "--timeout", "2h", until=lambda: prom.query(
        'orchestrator:task_in_progress_start_timestamp_seconds{job="stuck"}'))
    assert tuples(found, "job", "framework", "flow", "task") == {("stuck", "exec", "stuck", "main")}
    g = gw.group(job="stuck", flow="stuck", task="main")
    assert float(found[0]["value"][1]) == g.value("orchestrator_task_last_start_timestamp_seconds")
    assert g.value("orchestrator_task_timeout_seconds") == 7200
    # killed: it stays in progress, which the rules turn into an alert after its limit
    assert prom.query('orchestrator:task_in_progress_start_timestamp_seconds{job="stuck"}')


def test_a_killed_run_without_a_limit_raises_the_vanished_alert(
        prom: Prometheus, gw: Pushgateway) -> None:
    """kill -9 of `exec` mid-run (as by an OOM kill): nothing says it ended;
    past the flow's maximum age (2 s, short_limits.yml) the alert fires."""
    killed_exec(gw, "vanishing", until=lambda: any(
        "orchestrator_task_last_start_timestamp_seconds" in g.metrics
        for g in gw.groups() if g.labels.get("job") == "vanishing"))
    g = gw.group(job="vanishing", flow="vanishing", task="main")
    assert "orchestrator_task_last_completion_timestamp_seconds" not in g.metrics
    assert "orchestrator_task_timeout_seconds" not in g.metrics
    wait_until(lambda: firing(prom, "OrchestratorTaskVanished", "job", "flow", "task"),
               60, interval=0.5, what="OrchestratorTaskVanished")
    assert firing(prom, "OrchestratorTaskVanished", "job", "flow", "task") == {
        ("vanishing", "vanishing", "main")}
    (alert,) = [a for a in rules(prom)["OrchestratorTaskVanished"]["alerts"]
                if a["state"] == "firing"]
    assert "orchestrator-push status --job vanishing" in alert["annotations"]["description"]
    assert ("vanishing",) not in firing(prom, "OrchestratorTaskHung", "job")


def test_a_killed_run_past_its_limit_raises_the_hung_alert(
        prom: Prometheus, gw: Pushgateway) -> None:
    """kill -9 of `exec --timeout 10s` mid-run: nothing stops or ends it; 10 s
    plus its flow's grace (1 s, short_limits.yml) after its start, it is hung."""
    killed_exec(gw, "hanging", "--timeout", "10s", until=lambda: any(
        "orchestrator_task_timeout_seconds" in g.metrics
        for g in gw.groups() if g.labels.get("job") == "hanging"))
    g = gw.group(job="hanging", flow="hanging", task="main")
    assert g.value("orchestrator_task_timeout_seconds") == 10
    assert "orchestrator_task_last_completion_timestamp_seconds" not in g.metrics
    started = g.value("orchestrator_task_last_start_timestamp_seconds")
    wait_until(lambda: ("hanging", "hanging", "main") in firing(
        prom, "OrchestratorTaskHung", "job", "flow", "task"), 60, interval=0.5,
        what="OrchestratorTaskHung")
    assert time.time() - started > 11  # not before its limit and grace
    assert firing(prom, "OrchestratorTaskHung", "job", "flow", "task") == {
        ("hanging", "hanging", "main")}
    (alert,) = [a for a in rules(prom)["OrchestratorTaskHung"]["alerts"]
                if a["state"] == "firing"]
    assert alert["labels"]["severity"] == "critical"
    assert "orchestrator-push status --job hanging" in alert["annotations"]["description"]
    # it has a limit: "hung", never "vanished"
    assert ("hanging",) not in firing(prom, "OrchestratorTaskVanished", "job")


def test_a_sigkilled_airflow_task_raises_the_vanished_alert(
        prom: Prometheus, gw: Pushgateway, tmp_path: Any) -> None:
    """A real Airflow task (dag.test()) whose process group is SIGKILLed mid-run:
    its start is at the gateway, its end never comes; with no execution_timeout
    and its flow's 2 s maximum (short_limits.yml), OrchestratorTaskVanished fires."""
    python = story.framework_python("airflow")
    bindir = os.path.dirname(python)
    dags = tmp_path / "dags"
    dags.mkdir()
    dag_file = dags / "vanishing_dag.py"
    with open(os.path.join(os.path.dirname(__file__), "vanishing_dag.py")) as f:
        dag_file.write_text(f.read())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_PUSH_")},
           "ORCHESTRATOR_PUSH_URL": gw.url, "ORCHESTRATOR_PUSH_INTERVAL": "0.2",
           "ORCHESTRATOR_PUSH_SPOOL_DIR": str(tmp_path / "spool"),
           "AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    subprocess.run([os.path.join(bindir, "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)

    def started() -> bool:
        return any("orchestrator_task_last_start_timestamp_seconds" in g.metrics
                   for g in gw.groups()
                   if g.labels.get("flow") == "airflow_vanishing" and g.labels.get("task") == "hold")

    proc = subprocess.Popen([python, str(dag_file)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(started, 120, interval=0.2, what="the start of airflow_vanishing/hold")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    g = gw.group(job="airflow", flow="airflow_vanishing", task="hold")
    assert "orchestrator_task_last_completion_timestamp_seconds" not in g.metrics
    assert "orchestrator_task_timeout_seconds" not in g.metrics
    key = ("airflow", "airflow", "airflow_vanishing", "hold")
    wait_until(lambda: key in firing(prom, "OrchestratorTaskVanished",
                                     "job", "framework", "flow", "task"),
               60, interval=0.5, what="OrchestratorTaskVanished for the Airflow task")
    assert ("airflow_vanishing",) not in firing(prom, "OrchestratorTaskHung", "flow")


def test_the_demos_missed_run_fires_in_prometheus() -> None:
    """`make demo` ends by showing a missed run: a loop that ran once and
    stopped. Its own gateway and Prometheus, with the shipped rules only."""
    with contextlib.contextmanager(running)() as gw:
        p = Prometheus(gw.url, story.RULE_FILES)
        try:
            said: list[str] = []
            story.show_missed_run(gw, p, say=said.append)
            (alert,) = [a for a in rules(p)["OrchestratorTaskMissed"]["alerts"]
                        if a["state"] == "firing"]
            assert alert["labels"]["job"] == "heartbeat" and alert["labels"]["task"] == "main"
            g = gw.group(job="heartbeat", flow="heartbeat", task="main")
            ended = g.value("orchestrator_task_last_completion_timestamp_seconds")
            assert g.value("orchestrator_task_next_run_timestamp_seconds") == ended + 2
            assert said[-1].startswith("OrchestratorTaskMissed is firing")
        finally:
            p.stop()
