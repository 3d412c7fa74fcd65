"""Attempts that end outside the pool process that ran them: terminated, hard time
limits (also per call and redelivered), pool processes killed then retried or
requeued, rejected and requeued. Real prefork workers on a real Redis, a real
Pushgateway; each count is compared with what Celery itself recorded."""

from __future__ import annotations

import json

import pytest
import redis
from celery import Task
from gateway import Pushgateway, wait_until

NS = "orchestrator"


def wait_status(result, status: str, worker, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """Celery's own record of the task (its result backend), once it says ``status``."""
    client = redis.Redis.from_url(result.backend.url)
    last: list[dict] = []  # type: ignore[type-arg]

    def meta() -> dict | None:  # type: ignore[type-arg]
        raw = client.get(f"celery-task-meta-{result.id}")
        m = json.loads(raw) if raw else None
        last[:] = [m] if m else []
        return m if m is not None and m["status"] == status else None

    try:
        return wait_until(meta, timeout, interval=0.05, what=f"Celery to record {status}")
    except AssertionError:
        raise AssertionError(f"Celery recorded {last}\n{worker.output()[-4000:]}") from None


def deliveries(result) -> int:  # type: ignore[no-untyped-def]
    """How many times the task body started, as the task itself counted (celeryapp._times)."""
    return int(redis.Redis.from_url(result.backend.url).get(f"test:times:{result.id}") or 0)


def running(gw: Pushgateway, task: str) -> float | None:
    try:
        node = next(g for g in gw.groups() if "instance" in g.labels)
        return node.value(f"{NS}_tasks_running", task=task)
    except (StopIteration, KeyError):
        return None


def settle(gw: Pushgateway, expected: dict[str, float], worker) -> None:  # type: ignore[no-untyped-def]
    try:
        wait_until(lambda: gw.runs_by_status() == expected, 30, what=f"counts {expected}")
    except AssertionError:
        raise AssertionError(f"{gw.runs_by_status()}\n{worker.output()[-4000:]}") from None
    assert worker.stop() == 0
    assert gw.runs_by_status() == expected  # and nothing more arrived at the shutdown


def test_terminate_is_one_revoked_attempt_not_also_a_failure(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    r = app.sleep.delay(30)
    wait_until(lambda: running(pushgateway, "shop.sleep") == 1, 30, what="the task in progress")
    r.revoke(terminate=True)  # SIGTERM, Celery's default
    wait_status(r, "REVOKED", worker)
    settle(pushgateway, {"revoked": 1.0}, worker)
    g = pushgateway.group(job="celery", flow="shop", task="shop.sleep")
    assert g.value(f"{NS}_task_last_status", status="revoked") == 1
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics


@pytest.mark.skipif(not hasattr(Task, "retry_on_worker_lost"),
                    reason="retry_on_worker_lost is new in Celery 5.7")
def test_a_killed_pool_process_retried_by_celery_counts_the_lost_attempt(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    r = app.killed_then_retried.delay()
    wait_status(r, "SUCCESS", worker)
    settle(pushgateway, {"retry": 1.0, "success": 1.0}, worker)
    g = pushgateway.group(job="celery", flow="shop", task="shop.killed_then_retried")
    assert g.value(f"{NS}_task_last_attempt") == 2
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics


def test_a_killed_pool_process_requeued_counts_each_lost_attempt(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    r = app.killed_then_requeued.delay()
    wait_status(r, "SUCCESS", worker)
    assert deliveries(r) == 3  # two deliveries died with their pool process
    settle(pushgateway, {"retry": 2.0, "success": 1.0}, worker)
    g = pushgateway.group(job="celery", flow="shop", task="shop.killed_then_requeued")
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics
    node = next(g for g in pushgateway.groups() if "instance" in g.labels)
    # a lost attempt's duration is the time from its start to its loss: short here
    assert 0 < node.value(f"{NS}_task_duration_seconds", task="shop.killed_then_requeued",
                          status="retry", __sum__="1") < 10


def test_reject_with_requeue_is_a_retry_not_a_failure(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    r = app.rejected_then_ok.delay()
    wait_status(r, "SUCCESS", worker)
    assert deliveries(r) == 2
    settle(pushgateway, {"retry": 1.0, "success": 1.0}, worker)
    g = pushgateway.group(job="celery", flow="shop", task="shop.rejected_then_ok")
    assert f"{NS}_task_last_failure_timestamp_seconds" not in g.metrics


@pytest.mark.skipif(not hasattr(Task, "acks_on_timeout"),
                    reason="Celery before 5.5 acknowledges a message after a hard time limit "
                           "instead of requeueing it")
def test_each_hard_time_limit_of_a_redelivered_message_counts(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    r = app.timed_out_redelivered.delay()
    wait_status(r, "SUCCESS", worker, timeout=90)
    assert deliveries(r) == 5  # the same message (same task id) five times
    settle(pushgateway, {"failed": 4.0, "success": 1.0}, worker)
    node = next(g for g in pushgateway.groups() if "instance" in g.labels)
    assert node.value(f"{NS}_task_duration_seconds", task="shop.timed_out_redelivered",
                      status="failed", __sum__="1") == 4.0  # four times the 1 s limit


def test_a_per_call_hard_time_limit_is_the_attempts_duration(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    r = app.sleep.apply_async((30,), time_limit=2)
    assert "TimeLimitExceeded" in wait_status(r, "FAILURE", worker)["result"]["exc_type"]
    settle(pushgateway, {"failed": 1.0}, worker)
    g = pushgateway.group(job="celery", flow="shop", task="shop.sleep")
    assert g.value(f"{NS}_task_last_duration_seconds") == 2.0
    assert g.value(f"{NS}_task_timeout_seconds") == 2.0  # the request's, pushed at its start
    assert g.value(f"{NS}_task_last_status", status="failed") == 1


def test_ignore_and_replace_count_the_attempt_that_ran(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "solo")
    app.ignored.delay()
    r = app.replaced.delay()
    # the replacement (shop.ok) stores its result under the replaced task's id
    assert wait_status(r, "SUCCESS", worker)["result"] == 5
    # Both in one condition: a push can carry the ignored attempt before the replaced
    # one is recorded (CI saw it once), so waiting for one then asserting the other races.
    wait_until(lambda: (pushgateway.runs_by_status("shop.ignored") == {"success": 1.0}
                        and pushgateway.runs_by_status("shop.replaced") == {"success": 1.0}),
               30, what="the ignored and the replaced attempts")
    settle(pushgateway, {"success": 3.0}, worker)  # ignored, replaced, and its replacement ok
    assert pushgateway.runs_by_status("shop.ok") == {"success": 1.0}
