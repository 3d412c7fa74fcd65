"""Worker liveness, attempts in progress, queue wait and node names, with real
workers (a real `celery worker`, and embedded ones) on a real Redis and a real
Pushgateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from gateway import Group, Pushgateway, wait_until
from test_ends import wait_status

NS = "orchestrator"
HERE = os.path.dirname(__file__)


def node(gw: Pushgateway) -> Group | None:
    found = [g for g in gw.groups() if "instance" in g.labels]
    return found[0] if len(found) == 1 else None


def node_value(gw: Pushgateway, name: str, **labels: str) -> float | None:
    g = node(gw)
    try:
        return g.value(f"{NS}_{name}", **labels) if g is not None else None
    except KeyError:
        return None


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGQUIT], ids=["warm", "cold"])
def test_a_worker_is_up_while_it_runs_and_down_after_it_stops(
        pushgateway: Pushgateway, app, start_worker, stop: int) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    # up before any task ran
    wait_until(lambda: node_value(pushgateway, "worker_up", role="celery-worker") == 1, 20,
               what="worker_up 1")
    g = node(pushgateway)
    assert g is not None and g.labels["instance"].startswith("w1@")
    first = node_value(pushgateway, "worker_last_seen_timestamp_seconds")
    assert first is not None
    wait_until(lambda: (node_value(pushgateway, "worker_last_seen_timestamp_seconds") or 0) > first,
               20, what="a later heartbeat with no task run")
    worker.stop(stop)
    assert node_value(pushgateway, "worker_up", role="celery-worker") == 0, worker.output()[-3000:]


def test_a_killed_worker_stays_up_and_stops_being_seen(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "solo")
    wait_until(lambda: node_value(pushgateway, "worker_up") == 1, 20, what="worker_up 1")
    worker.stop(signal.SIGKILL)
    seen = node_value(pushgateway, "worker_last_seen_timestamp_seconds")
    # what the alert on staleness reads: up stays 1, last seen stops moving
    assert node_value(pushgateway, "worker_up") == 1
    assert seen is not None and node_value(pushgateway, "worker_last_seen_timestamp_seconds") == seen


def test_attempts_in_progress_and_the_oldest_start_match_celerys_own(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "2")
    results = [app.sleep.delay(4), app.sleep.delay(4)]
    wait_until(lambda: node_value(pushgateway, "tasks_running", task="shop.sleep") == 2, 20,
               what="two attempts in progress")
    name = worker_name(worker)
    active = app.app.control.inspect(destination=[name], timeout=5).active()[name]
    starts = sorted(t["time_start"] for t in active)
    assert len(starts) == 2
    assert node_value(pushgateway, "task_oldest_running_start_timestamp_seconds",
                      task="shop.sleep") == starts[0]
    # the task's own group: the newest start, while both run (no completion yet)
    g = pushgateway.group(job="celery", flow="shop", task="shop.sleep")
    assert g.value(f"{NS}_task_last_start_timestamp_seconds") == starts[1]
    assert f"{NS}_task_last_completion_timestamp_seconds" not in g.metrics
    for r in results:
        wait_status(r, "SUCCESS", worker)
    wait_until(lambda: node_value(pushgateway, "tasks_running", task="shop.sleep") == 0, 20,
               what="none in progress")
    g = node(pushgateway)
    assert g is not None
    assert not [s for s in g.metrics.get(f"{NS}_task_oldest_running_start_timestamp_seconds", [])
                if s[0].get("task") == "shop.sleep"]
    assert worker.stop() == 0


def worker_name(worker) -> str:  # type: ignore[no-untyped-def]
    line = next(x for x in worker.output().splitlines() if " ready." in x)
    return line.rsplit(" ready.", 1)[0].rsplit(" ", 1)[1]


def test_queue_wait_from_publish_and_from_the_due_time(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "solo")
    busy = app.sleep.delay(1.5)
    behind = app.ok.delay(1)  # published now, starts once the solo worker is free
    wait_status(behind, "SUCCESS", worker)
    wait_status(busy, "SUCCESS", worker)
    def waited() -> float | None:
        try:
            g = pushgateway.group(job="celery", flow="shop", task="shop.ok")
            return g.value(f"{NS}_task_last_queued_duration_seconds")
        except KeyError:
            return None

    first = wait_until(waited, 20, what="queue wait pushed")
    assert 1.3 <= first < 30, first
    # countdown: measured from the due time, not from the publish 1.5 s earlier
    later = app.ok.apply_async((2,), countdown=1.5)
    wait_status(later, "SUCCESS", worker)
    second = wait_until(lambda: waited() != first and waited(), 20, what="the second queue wait")
    assert second < 1.0, second
    assert worker.stop() == 0
    assert node_value(pushgateway, "task_queued_seconds", task="shop.ok", __count__="1") == 2


# One node per process: two embedded nodes in one process lose tasks in Celery
# itself, without us (5.7: 1 to 24 of 30 finished now and then, solo and
# threads; prefork 4 of 5), so a test of them would be flaky.
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_embedded_nodes_on_one_host_keep_their_own_groups(
        pushgateway: Pushgateway, app, redis_url: str, pool: str) -> None:
    n = 15
    env = {**os.environ, "TEST_REDIS_URL": redis_url, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "ORCHESTRATOR_PUSH_INTERVAL": "0.2",
           "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "embedded.py"), name, str(n),
                               pool], env=env, cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for name in ("e1@box", "e2@box")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    groups = {g.labels["instance"]: g for g in pushgateway.groups() if "instance" in g.labels}
    # each node its own group, named as the node (not after the machine), counts exact
    assert set(groups) == {"e1@box", "e2@box"}, (groups.keys(), outputs)
    assert pushgateway.runs_by_status() == {"success": float(2 * n)}, outputs
    for g in groups.values():
        assert g.value(f"{NS}_worker_up") == 0, outputs  # both stopped cleanly
