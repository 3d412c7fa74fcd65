"""Three real gateways, each group on two of them, one stopped mid-run: a real
Prometheus scraping all three (the shipped scrape config's `pushgateway`
label) with the shipped rules sees every task's newest run, once."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from alerting import MATRIX_RULES
from gateway import Prometheus, Pushgateway, start, wait_until

import orchestrator_push as op
from orchestrator_push import doctor
from orchestrator_push.config import load_config
from orchestrator_push.records import TaskRecord

FLOWS = [f"f{i}" for i in range(12)]
END = 1_700_000_000.0


def edited_thresholds(path: str, tmp_path: str) -> str:
    with open(path) as f:
        text = f.read()
    shipped = "record: orchestrator:push_replicas\n        expr: vector(1)"
    assert shipped in text
    edited = os.path.join(tmp_path, "thresholds.yml")
    with open(edited, "w") as f:
        f.write(text.replace(shipped, shipped.replace("vector(1)", "vector(2)")))
    return edited


@pytest.fixture
def stack(tmp_path: str) -> Iterator[tuple[list[Pushgateway], Prometheus]]:
    gws = [start(extra_args=[f"--persistence.file={tmp_path}/gw{i}"]) for i in range(3)]
    # thresholds.yml as a user with ORCHESTRATOR_PUSH_REPLICAS=2 edits it
    rules = [edited_thresholds(r, tmp_path) if r.endswith("thresholds.yml") else r
             for r in MATRIX_RULES]
    prom = None
    try:
        prom = Prometheus(",".join(gw.url for gw in gws), rules)
        yield gws, prom
    finally:
        if prom is not None:
            prom.stop()
        for gw in gws:
            gw.stop()


def by_flow(prom: Prometheus, expr: str) -> dict[str, float]:
    return {r["metric"]["flow"]: float(r["value"][1]) for r in prom.query(expr)}


def statuses(prom: Prometheus) -> dict[str, str]:
    rows = prom.query('max by (flow, status) (orchestrator:task_last_status{job="celery"}) == 1')
    return {r["metric"]["flow"]: r["metric"]["status"] for r in rows}


def failing(prom: Prometheus) -> set[str]:
    return set(by_flow(prom, 'ALERTS{alertname="OrchestratorTaskFailed",alertstate="firing"}'))


def run_doctor(url: str, replicas: int, prom: Prometheus) -> tuple[int, str]:
    out = io.StringIO()
    code = doctor.run(out, {"ORCHESTRATOR_PUSH_URL": url,
                            "ORCHESTRATOR_PUSH_REPLICAS": str(replicas),
                            "ORCHESTRATOR_PUSH_SPOOL_DIR": "off"}, prometheus=prom.url)
    return code, out.getvalue()


def missed(prom: Prometheus) -> bool:
    return bool(prom.query('ALERTS{alertname="OrchestratorTaskMissed",alertstate="firing",'
                           'flow="nightly"}'))


def test_replicas_2_one_gateway_stopped_prometheus_misses_nothing(
    stack: tuple[list[Pushgateway], Prometheus]
) -> None:
    gws, prom = stack
    url = ",".join(gw.url for gw in gws)
    e = op.Engine(load_config({}, url=url, replicas=2, interval=0.05))
    # Every flow's task fails; then, with a gateway stopped, half of them succeed.
    for f in FLOWS:
        e.record_task(TaskRecord("celery", f, "t", "failed", END + 1, 1.0, 1))
    # and a nightly run that did not start
    e.record_schedule("exec", "nightly", "main", next_run=time.time() - 60, grace=1)
    assert e.flush(10)
    wait_until(lambda: failing(prom) == set(FLOWS), 30, what="TaskFailed for every flow")
    wait_until(lambda: missed(prom), 30, what="OrchestratorTaskMissed for the nightly run")
    down = gws[1]
    down.stop()  # its persistence file keeps the failures
    # One gateway of three out, each group on two: nothing is held back.
    instance = f"127.0.0.1:{down.port}"
    wait_until(lambda: prom.query(f'orchestrator:pushgateway_unknown{{instance="{instance}"}}'),
               30, what="the stopped gateway unknown to the rules")
    out_since = time.time()
    wait_until(lambda: prom.evaluated_since(out_since), 30, what="the rules saw it out")
    assert not prom.query('ALERTS{alertname="OrchestratorPushRecovering"}')
    assert missed(prom)
    fixed = FLOWS[::2]
    for f in FLOWS:
        status = "success" if f in fixed else "failed"
        e.record_task(TaskRecord("celery", f, "t", status, END + 2, 1.0, 2))
    assert e.flush(10)
    stats = e.stats()
    assert sum(stats.lost.values()) == 0 and stats.spooled == 0
    e.close(5)  # what the stopped gateway missed dies with the process: it stays stale

    newest = {f: "success" if f in fixed else "failed" for f in FLOWS}
    wait_until(lambda: statuses(prom) == newest, 30, what="every flow's newest status")
    wait_until(lambda: failing(prom) == set(FLOWS) - set(fixed), 30,
               what="TaskFailed for exactly the flows whose newest run failed")

    # Back from its persistence file with the old failures: the rules still
    # take each flow's newest copy.
    persisted = [a for a in down.args if a.startswith("--persistence.file=")]
    gws[1] = start(port=down.port, extra_args=persisted)
    stale = f'{{job="celery", pushgateway="127.0.0.1:{down.port}"}}'
    held = wait_until(
        lambda: by_flow(prom, f"orchestrator_task_last_completion_timestamp_seconds{stale}"),
        30, what="Prometheus scrapes the restarted gateway's stale copies")
    assert set(held.values()) == {END + 1} and len(held) >= 4  # 2 of 3 groups on each
    seen = time.time()
    wait_until(lambda: prom.evaluated_since(seen), 30, what="the rules saw the stale copies")
    assert by_flow(prom, 'max by (flow) (orchestrator_task_last_completion_timestamp_seconds'
                         '{job="celery"})') == {f: END + 2 for f in FLOWS}
    assert statuses(prom) == newest
    assert failing(prom) == set(FLOWS) - set(fixed)
    assert set(by_flow(prom, 'orchestrator:task_last_status{job="celery", status="failed"} == 1'
                       )) == set(FLOWS) - set(fixed)

    code, text = run_doctor(url, 2, prom)
    assert code == 0, text
    ports = sorted(f"127.0.0.1:{gw.port}" for gw in gws)
    assert f"[  ok] a pushgateway label per gateway: 3 of 3 gateways scraped: {', '.join(ports)}" \
        in text
    assert "[  ok] gateways: 3 gateways, each group on 2 of them (ORCHESTRATOR_PUSH_REPLICAS)" \
        in text
    assert "[  ok] replicas in the rules: orchestrator:push_replicas 2, " \
        "ORCHESTRATOR_PUSH_REPLICAS 2" in text
    # processes that put each group on all three: the rules hold back too soon
    code, text = run_doctor(url, 3, prom)
    assert code == 0, text
    assert "[warn] replicas in the rules: orchestrator:push_replicas 2, " \
        "ORCHESTRATOR_PUSH_REPLICAS 3: absence alerts are held back while 2 gateway(s) " \
        "are out, although no group is missing until 3 are" in text
    # processes that put each group on one: alerts about its missing groups go out
    code, text = run_doctor(url, 1, prom)
    assert code == 1, text
    assert "[FAIL] replicas in the rules: orchestrator:push_replicas 2, " \
        "ORCHESTRATOR_PUSH_REPLICAS 1: with 1 gateway(s) out some groups have no copy, " \
        "and their absence alerts are not held back: false alerts" in text
