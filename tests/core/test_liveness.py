"""Long-lived processes' liveness, attempts in progress and queue waits, at a real Pushgateway."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from gateway import Pushgateway, wait_until

import orchestrator_push as op
from orchestrator_push.records import TaskRecord

NS = "orchestrator"
NODE = (("instance", "w1@host"),)

_engines: list[op.Engine] = []


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    while _engines:
        _engines.pop().close(0)


def engine_for(url: str) -> op.Engine:
    e = op.Engine(op.load_config({}, url=url, interval=0.05))
    _engines.append(e)
    return e


def test_a_node_says_it_is_up_every_interval_and_down_at_a_clean_shutdown(
        pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    before = time.time()
    e.register_node(NODE, "celery", "celery-worker")
    assert e.flush(10)
    g = pushgateway.group(job="celery", instance="w1@host")
    assert g.value(f"{NS}_worker_up", framework="celery", role="celery-worker") == 1
    first = g.value(f"{NS}_worker_last_seen_timestamp_seconds", role="celery-worker")
    assert first >= before
    # No record at all: the liveness alone is pushed again, later.
    wait_until(lambda: pushgateway.group(job="celery", instance="w1@host").value(
        f"{NS}_worker_last_seen_timestamp_seconds") > first, 10, what="a later heartbeat")
    e.node_down(NODE, "celery")
    assert e.flush(10)
    g = pushgateway.group(job="celery", instance="w1@host")
    assert g.value(f"{NS}_worker_up", role="celery-worker") == 0
    down_at = g.value(f"{NS}_worker_last_seen_timestamp_seconds")
    time.sleep(0.3)  # an observation window: six intervals with no beat after the shutdown
    g = pushgateway.group(job="celery", instance="w1@host")
    assert g.value(f"{NS}_worker_up") == 0
    assert g.value(f"{NS}_worker_last_seen_timestamp_seconds") == down_at


def test_attempts_in_progress_come_from_the_node_and_known_tasks_fall_back_to_zero(
        pushgateway: Pushgateway) -> None:
    running: dict[tuple[str, str], tuple[int, float]] = {
        ("shop", "shop.slow"): (2, 1_700_000_000.0),
        ("shop", "a/b"): (1, 1_700_000_500.0),
    }
    e = engine_for(pushgateway.url)
    e.register_node(NODE, "celery", "celery-worker", running=lambda: dict(running))
    # finished on this node, never seen in progress at a push: 0, not absent
    e.record_task(TaskRecord("celery", "shop", "shop.quick", "success", time.time(), 0.01),
                  cumulative=NODE)
    assert e.flush(10)
    g = pushgateway.group(job="celery", instance="w1@host")
    assert g.value(f"{NS}_tasks_running", task="shop.quick") == 0
    assert g.value(f"{NS}_tasks_running", task="shop.slow") == 2
    assert g.value(f"{NS}_task_oldest_running_start_timestamp_seconds",
                   task="shop.slow") == 1_700_000_000.0
    assert g.value(f"{NS}_tasks_running", flow="shop", task="a/b") == 1
    running.clear()
    wait_until(lambda: pushgateway.group(job="celery", instance="w1@host").value(
        f"{NS}_tasks_running", task="shop.slow") == 0, 10, what="nothing in progress")
    g = pushgateway.group(job="celery", instance="w1@host")
    assert g.value(f"{NS}_tasks_running", task="a/b") == 0
    assert f"{NS}_task_oldest_running_start_timestamp_seconds" not in g.metrics or \
        g.metrics[f"{NS}_task_oldest_running_start_timestamp_seconds"] == []


def test_a_failing_sampler_costs_the_push_nothing_else(pushgateway: Pushgateway) -> None:
    def broken() -> dict[tuple[str, str], tuple[int, float]]:
        raise RuntimeError("framework state changed under us")

    e = engine_for(pushgateway.url)
    e.register_node(NODE, "celery", "celery-worker", running=broken)
    e.record_task(TaskRecord("celery", "shop", "shop.ok", "success", time.time(), 0.1),
                  cumulative=NODE)
    assert e.flush(10)
    g = pushgateway.group(job="celery", instance="w1@host")
    assert g.value(f"{NS}_task_runs_total", task="shop.ok", status="success") == 1
    assert g.value(f"{NS}_worker_up") == 1


def test_queue_wait_is_the_last_attempts_gauge_and_a_per_node_histogram(
        pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    now = time.time()
    for q in (0.02, 0.2, 3.0):
        e.record_task(TaskRecord("celery", "shop", "shop.ok", "success", now, 0.1, queued=q),
                      cumulative=NODE)
    e.record_task(TaskRecord("celery", "shop", "shop.ok", "success", now, 0.1, queued=float("nan")),
                  cumulative=NODE)  # a bad value is not a queue wait
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="shop", task="shop.ok")
    assert f"{NS}_task_last_queued_duration_seconds" not in g.metrics  # the newest had none
    e.record_task(TaskRecord("celery", "shop", "shop.ok", "success", now + 1, 0.1, queued=1.5))
    assert e.flush(10)
    g = pushgateway.group(job="celery", flow="shop", task="shop.ok")
    assert g.value(f"{NS}_task_last_queued_duration_seconds") == 1.5
    h = pushgateway.group(job="celery", instance="w1@host")
    name = f"{NS}_task_queued_seconds"
    assert h.types[name] == "HISTOGRAM"
    assert h.value(name, task="shop.ok", __count__="1") == 3
    assert h.value(name, task="shop.ok", __sum__="1") == pytest.approx(3.22)
    assert h.value(name, task="shop.ok", le="0.05") == 1
    assert h.value(name, task="shop.ok", le="5") == 3


def test_a_start_is_pushed_while_the_attempt_runs_and_its_end_follows(
        pushgateway: Pushgateway) -> None:
    e = engine_for(pushgateway.url)
    e.record_start("exec", "backup", "dump", at=1_700_000_000.0, timeout=3600, waited=2.5)
    e.record_start("exec", "backup", None, at=1_699_999_999.0, waited=30.0)
    assert e.flush(10)
    g = pushgateway.group(job="exec", flow="backup", task="dump")
    assert g.value(f"{NS}_task_last_start_timestamp_seconds", framework="exec") == 1_700_000_000.0
    assert g.value(f"{NS}_task_timeout_seconds") == 3600
    assert g.value(f"{NS}_task_last_queued_duration_seconds") == 2.5
    assert f"{NS}_task_last_completion_timestamp_seconds" not in g.metrics  # in progress
    f = pushgateway.group(job="exec", flow="backup")
    assert f.value(f"{NS}_flow_last_start_timestamp_seconds") == 1_699_999_999.0
    assert f"{NS}_flow_timeout_seconds" not in f.metrics
    assert f.value(f"{NS}_flow_last_start_delay_seconds") == 30.0
    e.record_task(TaskRecord("exec", "backup", "dump", "success", 1_700_000_050.0, 50.0))
    # an older start reported late never hides the newer one
    e.record_start("exec", "backup", "dump", at=1_600_000_000.0)
    assert e.flush(10)
    g = pushgateway.group(job="exec", flow="backup", task="dump")
    assert g.value(f"{NS}_task_last_start_timestamp_seconds") == 1_700_000_000.0
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == 1_700_000_050.0


def test_a_start_and_end_within_one_interval_cost_one_push(pushgateway: Pushgateway) -> None:
    e = op.Engine(op.load_config({}, url=pushgateway.url, interval=5))
    _engines.append(e)
    before = pushgateway.push_count()
    now = time.time()
    e.record_start("exec", "quick", "main", at=now)
    e.record_task(TaskRecord("exec", "quick", "main", "success", now + 0.01, 0.01))
    assert e.flush(10)
    assert pushgateway.push_count() - before == 1
    g = pushgateway.group(job="exec", flow="quick", task="main")
    assert g.value(f"{NS}_task_last_start_timestamp_seconds") == now
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") == now + 0.01
