"""Airflow listener plugin: real dag.test() runs, loaded through the installed entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from gateway import Pushgateway, free_port, start

NS = "orchestrator"
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = str(tmp_path_factory.mktemp("airflow-home"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_PUSH_")}
    env.update({"AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": HERE})
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    subprocess.run([os.path.join(bindir, "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    yield env


def run_sample(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="op-marker-") as marker:
        # a spool (and host count store) of each run's own, never the user's
        extra.setdefault("ORCHESTRATOR_PUSH_SPOOL_DIR", os.path.join(marker, "spool"))
        return subprocess.run([sys.executable, os.path.join(HERE, "sample_dag.py")],
                              env={**env, "SAMPLE_MARKER_DIR": marker, **extra},
                              capture_output=True, text=True, timeout=300)


EXPECTED_STATES = {"ok[-1]": "success", "fail[-1]": "failed", "flaky[-1]": "success",
                   "skip[-1]": "skipped", "double[0]": "success", "double[1]": "success",
                   "double[2]": "success"}


def states(p: subprocess.CompletedProcess[str]) -> dict[str, str]:
    line = next(x for x in p.stdout.splitlines() if x.startswith("STATES "))
    return json.loads(line.split(" ", 1)[1].rsplit(" RUN ", 1)[0])  # type: ignore[no-any-return]


def test_plugin_is_listed(airflow_env: dict[str, str]) -> None:
    p = subprocess.run(["airflow", "plugins"], env=airflow_env, capture_output=True, text=True,
                       timeout=120)
    assert "orchestrator_push.airflow.Listener" in p.stdout


def test_dag_test_reports_every_task_and_the_dag_run(airflow_env: dict[str, str],
                                                     pushgateway: Pushgateway) -> None:
    p = run_sample(airflow_env, ORCHESTRATOR_PUSH_URL=pushgateway.url)
    assert p.returncode == 0, p.stderr[-3000:]
    assert states(p) == EXPECTED_STATES

    def group(task: str):  # type: ignore[no-untyped-def]
        return pushgateway.group(job="airflow", flow="sample", task=task)

    g = group("ok")
    assert g.value(f"{NS}_task_last_status", framework="airflow", status="success") == 1
    for other in ("failed", "retry", "skipped"):
        assert g.value(f"{NS}_task_last_status", status=other) == 0
    assert g.value(f"{NS}_task_last_attempt") == 1
    assert 0 < g.value(f"{NS}_task_last_duration_seconds") < 120
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == \
        g.value(f"{NS}_task_last_completion_timestamp_seconds")
    g = group("fail")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert f"{NS}_task_last_failure_timestamp_seconds" in g.metrics
    g = group("flaky")  # failed once (retry), then succeeded on try 2
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    assert g.value(f"{NS}_task_last_attempt") == 2
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics
    g = group("skip")
    assert g.value(f"{NS}_task_last_status", status="skipped") == 1
    g = group("double")  # three mapped instances share the task_id
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    f = pushgateway.group(job="airflow", flow="sample")
    assert f.value(f"{NS}_flow_last_status", status="failed") == 1
    assert f.value(f"{NS}_flow_last_duration_seconds") > 0
    assert f.value(f"{NS}_flow_last_failure_timestamp_seconds") > 0
    # counted when the DAG run ended, from Airflow's record: every try of every instance
    assert counts(pushgateway) == COUNTS


#: what one run of the sample DAG counts, by (task, status); its DAG run failed
COUNTS = {("ok", "success"): 1, ("fail", "failed"): 1, ("flaky", "retry"): 1,
          ("flaky", "success"): 1, ("skip", "skipped"): 1, ("double", "success"): 3,
          ("sample", "failed"): 1}


def counts(gw: Pushgateway) -> dict[tuple[str, str], float]:
    """Task attempts by (task, status), and DAG runs by (flow, status), over every group."""
    out: dict[tuple[str, str], float] = {}
    for g in gw.groups():
        for labels, v in g.metrics.get(f"{NS}_task_runs_total", []):
            key = (labels["task"], labels["status"])
            out[key] = out.get(key, 0) + v
        for labels, v in g.metrics.get(f"{NS}_flow_runs_total", []):
            key = (labels["flow"], labels["status"])
            out[key] = out.get(key, 0) + v
    return out


def test_airflow_cfg_section_is_read(airflow_env: dict[str, str], pushgateway: Pushgateway) -> None:
    p = run_sample(airflow_env, AIRFLOW__ORCHESTRATOR_PUSH__URL=pushgateway.url,
                   AIRFLOW__ORCHESTRATOR_PUSH__JOB="from-cfg",
                   AIRFLOW__ORCHESTRATOR_PUSH__LABELS="env=test",
                   AIRFLOW__ORCHESTRATOR_PUSH__BUCKETS="1m,1h")
    assert p.returncode == 0, p.stderr[-3000:]
    g = pushgateway.group(job="from-cfg", flow="sample", task="ok", env="test")
    assert g.value(f"{NS}_task_last_status", status="success") == 1
    # the host's counts have the chosen bounds only; every try took under a minute
    host = [h for h in pushgateway.groups() if h.labels.get("job") == "from-cfg"
            and "instance" in h.labels]
    assert len(host) == 1
    series = host[0].histogram(f"{NS}_task_duration_seconds")
    assert series and sum(s["count"] for s in series.values()) == sum(
        v for (task, _), v in COUNTS.items() if task != "sample")
    for s in series.values():
        assert set(s) == {"60", "3600", "+Inf", "count", "sum"}
        assert s["60"] == s["3600"] == s["+Inf"] == s["count"]


def test_gateway_down_leaves_outcomes_unchanged(airflow_env: dict[str, str],
                                                 tmp_path: object) -> None:
    port = free_port()
    spool = str(tmp_path)
    p = run_sample(airflow_env, ORCHESTRATOR_PUSH_URL=f"http://127.0.0.1:{port}",
                   ORCHESTRATOR_PUSH_FLUSH_TIMEOUT="1", ORCHESTRATOR_PUSH_TIMEOUT="1",
                   ORCHESTRATOR_PUSH_SPOOL_DIR=spool)
    assert p.returncode == 0, p.stderr[-3000:]
    # the same outcomes as with a gateway
    assert states(p) == EXPECTED_STATES
    assert "RUN failed" in p.stdout
    # what could not be delivered waits in the spool; the next run delivers it
    assert os.listdir(spool)
    gw = start(port=port)
    try:
        p = run_sample(airflow_env, ORCHESTRATOR_PUSH_URL=gw.url, ORCHESTRATOR_PUSH_SPOOL_DIR=spool)
        assert p.returncode == 0, p.stderr[-3000:]
        assert os.listdir(spool) == ["counts"]  # replayed (and never over the newer values)
        g = gw.group(job="airflow", flow="sample", task="ok")
        assert g.value(f"{NS}_task_last_status", status="success") == 1
        # the first run's counts waited in the host's store: both runs are counted
        assert counts(gw) == {k: 2 * v for k, v in COUNTS.items()}
    finally:
        gw.stop()


def run_with_logging(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with Airflow's settings, our log on stdout."""
    script = ("import logging, sys\nlogging.basicConfig(stream=sys.stdout)\n"
              "from orchestrator_push import airflow, runtime\n" + code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)


def test_an_invalid_airflow_setting_names_where_it_was_set(airflow_env: dict[str, str]) -> None:
    p = run_with_logging(
        {**airflow_env, "AIRFLOW__ORCHESTRATOR_PUSH__INTERVAL": "soon"},
        "print('engine', runtime.get_engine(airflow._airflow_settings, airflow.AIRFLOW_SOURCE))\n")
    assert "engine None" in p.stdout, p.stdout + p.stderr
    assert "ORCHESTRATOR_PUSH_INTERVAL" in p.stdout
    assert "AIRFLOW__ORCHESTRATOR_PUSH__INTERVAL" in p.stdout


def test_an_unreadable_airflow_cfg_section_is_logged(airflow_env: dict[str, str],
                                                      tmp_path: object) -> None:
    home = str(tmp_path)
    with open(os.path.join(airflow_env["AIRFLOW_HOME"], "airflow.cfg")) as f:
        cfg = f.read()
    with open(os.path.join(home, "airflow.cfg"), "w") as f:
        # a %-interpolation that configparser cannot resolve
        f.write(cfg + "\n[orchestrator_push]\nurl = http://gw:9091/%(missing)s\n")
    p = run_with_logging({**airflow_env, "AIRFLOW_HOME": home},
                         "print(airflow._airflow_settings())\n")
    assert "cannot read the [orchestrator_push] section of airflow.cfg" in p.stdout, (
        p.stdout + p.stderr)
