"""deploy/alertmanager: a real Alertmanager with the shipped routes and inhibitions,
sending to a webhook receiver inside the test.

The shipped file is used as it is, with two changes: the receivers' URL points
at this test's receiver, and the grouping waits are 1 s instead of 30 s / 5 min
(the routes and inhibit rules are the shipped ones)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from alerting import CONFIG, Alertmanager, Receiver, binary
from gateway import wait_until


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
def alertmanager(receiver: Receiver) -> Iterator[Alertmanager]:
    try:
        am = Alertmanager(receiver.url)
    except RuntimeError as exc:  # a missing binary is an error, with how to install it
        pytest.fail(str(exc), pytrace=False)
    yield am
    am.stop()


def test_the_shipped_config_is_valid() -> None:
    try:
        amtool = binary("amtool")
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    p = subprocess.run([amtool, "check-config", CONFIG], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 inhibit rules" in p.stdout and "3 receivers" in p.stdout


def alert(name: str, severity: str, job: str, **labels: str) -> dict[str, str]:
    return {"alertname": name, "severity": severity, "job": job, **labels}


def test_an_outage_of_our_delivery_is_one_alert_and_holds_back_the_runs_it_hid(
    alertmanager: Alertmanager, receiver: Receiver
) -> None:
    alertmanager.fire(
        alert("OrchestratorPushRecovering", "none", "pushgateway", instance="pgw:9091"),
        alert("OrchestratorPushOutage", "critical", "pushgateway", instance="pgw:9091"),
        alert("OrchestratorFlowMissed", "critical", "airflow", flow="nightly"),
        alert("OrchestratorTaskHung", "critical", "exec", flow="backup", task="main"),
        alert("OrchestratorWorkerDown", "critical", "celery", instance="w1@host"),
        alert("OrchestratorFlowLate", "warning", "prefect", flow="sync"),
        alert("OrchestratorPushFailing", "warning", "airflow"),
        # a failure that did arrive is real, outage or not
        alert("OrchestratorTaskFailed", "warning", "airflow", flow="etl", task="load"),
    )
    held = [("OrchestratorFlowMissed", "airflow"), ("OrchestratorTaskHung", "exec"),
            ("OrchestratorWorkerDown", "celery"), ("OrchestratorFlowLate", "prefect"),
            ("OrchestratorPushFailing", "airflow")]
    wait_until(lambda: all(alertmanager.suppressed(name, job) for name, job in held), 30,
               what="the alerts about runs that did not arrive held back")
    wait_until(lambda: receiver.alerts("/pager") and receiver.alerts("/chat"), 30,
               what="both receivers to be sent something")
    assert alertmanager.state("OrchestratorPushRecovering", "pushgateway")["state"] == "active"
    assert receiver.alerts("/pager") == {("OrchestratorPushOutage", "pushgateway")}
    assert receiver.alerts("/chat") == {("OrchestratorTaskFailed", "airflow")}


def test_a_job_whose_pushes_fail_holds_back_only_its_own_absence_alerts(
    alertmanager: Alertmanager, receiver: Receiver
) -> None:
    alertmanager.fire(
        alert("OrchestratorPushFailing", "warning", "backup"),
        alert("OrchestratorTaskMissed", "critical", "backup", flow="backup", task="main"),
        alert("OrchestratorTaskMissed", "critical", "reports", flow="reports", task="main"),
    )
    wait_until(lambda: alertmanager.suppressed("OrchestratorTaskMissed", "backup"), 30,
               what="the missed run of job backup held back")
    wait_until(lambda: receiver.alerts("/pager") and receiver.alerts("/chat"), 30,
               what="both receivers to be sent something")
    assert receiver.alerts("/pager") == {("OrchestratorTaskMissed", "reports")}
    assert receiver.alerts("/chat") == {("OrchestratorPushFailing", "backup")}


def test_one_gateway_out_of_several_is_a_page_and_holds_nothing_back(
    alertmanager: Alertmanager, receiver: Receiver
) -> None:
    # With replicas, one gateway out hides no group: OrchestratorPushRecovering
    # does not fire (deploy/prometheus/rules.yml), only the outage does.
    alertmanager.fire(
        alert("OrchestratorPushOutage", "critical", "pushgateway", instance="pg-2:9091"),
        alert("OrchestratorFlowMissed", "critical", "airflow", flow="nightly"),
        alert("OrchestratorWorkerDown", "critical", "celery", instance="w1@host"),
        alert("OrchestratorFlowLate", "warning", "prefect", flow="sync"),
    )
    pages = {("OrchestratorPushOutage", "pushgateway"), ("OrchestratorFlowMissed", "airflow"),
             ("OrchestratorWorkerDown", "celery")}
    wait_until(lambda: receiver.alerts("/pager") == pages and receiver.alerts("/chat"), 30,
               what="the outage and the absence alerts sent")
    assert receiver.alerts("/chat") == {("OrchestratorFlowLate", "prefect")}
    assert alertmanager.state("OrchestratorFlowMissed", "airflow")["inhibitedBy"] == []
