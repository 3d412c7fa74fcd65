"""gevent and eventlet pools (nox session celery_green sets TEST_GREEN_POOL): exact
counts, terminate, hard time limits, attempts in progress. Real workers, real Redis,
real Pushgateway."""

from __future__ import annotations

import os

import pytest
from gateway import Pushgateway, wait_until
from test_celery import wait_results
from test_ends import running, settle, wait_status

NS = "orchestrator"
POOL = os.environ.get("TEST_GREEN_POOL", "")
if POOL not in ("gevent", "eventlet"):
    raise RuntimeError("run through `nox -s celery_green`, which sets TEST_GREEN_POOL")


def test_counts_are_exact(pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", POOL, "-c", "10")
    results = [app.ok.delay(i) for i in range(30)] + [app.fail.delay() for _ in range(3)]
    wait_results(results, worker)
    settle(pushgateway, {"success": 30.0, "failed": 3.0}, worker)
    node = next(g for g in pushgateway.groups() if "instance" in g.labels)
    assert node.labels["instance"].startswith("w1@")
    assert node.value(f"{NS}_worker_up") == 0


def test_terminate_is_one_revoked_attempt(pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", POOL, "-c", "4")
    r = app.sleep.delay(30)
    wait_until(lambda: running(pushgateway, "shop.sleep") == 1, 30, what="the task in progress")
    r.revoke(terminate=True)
    wait_status(r, "REVOKED", worker)
    settle(pushgateway, {"revoked": 1.0}, worker)
    g = pushgateway.group(job="celery", flow="shop", task="shop.sleep")
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics


@pytest.mark.skipif(POOL == "eventlet", reason="Celery's eventlet pool enforces no time limits")
def test_a_hard_time_limit_is_one_failure_of_the_limits_duration(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", POOL, "-c", "4")
    r = app.hard_limit.delay()
    wait_status(r, "FAILURE", worker)
    settle(pushgateway, {"failed": 1.0}, worker)
    g = pushgateway.group(job="celery", flow="shop", task="shop.hard_limit")
    assert g.value(f"{NS}_task_last_duration_seconds") == 1.0
