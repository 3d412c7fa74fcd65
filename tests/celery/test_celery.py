"""Celery adapter: real workers (prefork, threads, solo) on a real Redis, a real Pushgateway."""

from __future__ import annotations

import json
import os

import pytest
import redis
from gateway import Pushgateway, free_port, start, wait_until

import orchestrator_push as op

NS = "orchestrator"


def wait_results(results: list, worker, timeout: float = 60) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    """Read the results' Redis keys directly: Celery 5.4's pub/sub result consumer
    can miss a result that was stored, and then never reports it ready."""
    client = redis.Redis.from_url(results[0].backend.url)
    pending: list[str] = []

    def metas() -> list | None:  # type: ignore[type-arg]
        raw = [client.get(f"celery-task-meta-{r.id}") for r in results]
        decoded = [json.loads(v) if v else None for v in raw]
        pending[:] = [r.id for r, m in zip(results, decoded, strict=True)
                      if m is None or m["status"] not in ("SUCCESS", "FAILURE", "REVOKED")]
        return None if pending else decoded

    try:
        return wait_until(metas, timeout, interval=0.05, what="task results")  # type: ignore[no-any-return]
    except AssertionError:
        raise AssertionError(f"no result for {pending}\n{worker.output()[-6000:]}") from None


def cumulative_groups(gw: Pushgateway) -> list[dict[str, str]]:
    return [g.labels for g in gw.groups() if f"{NS}_task_runs_total" in g.metrics]


def test_prefork_recycling_counts_are_exact(pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1",
                          "--max-tasks-per-child", "3")
    # Waves of three attempts, the next sent once the child that ran three has been
    # replaced: a task Celery hands to a child that is recycling waits seconds, and
    # in a CI run one never ran (Celery's race, seen without this library too).
    waves = [[app.ok.delay, app.ok.delay, app.fail.delay]] * 4 + [[app.ok.delay] * 3] * 4
    waves += [[app.flaky.delay, app.ok.delay]] * 3  # flaky: a retry attempt, then success
    children: set[int] = set()
    for wave in waves:
        before = wait_until(worker.pool, 20, what="a pool process")
        children |= before
        wait_results([send() for send in wave], worker)
        wait_until(lambda: worker.pool() and not worker.pool() & before, 20,  # noqa: B023
                   what="the child recycled")
    assert len(children) == len(waves)
    expected = {"success": 23.0 + 3.0, "failed": 4.0, "retry": 3.0}  # 23 ok, 3 flaky
    wait_until(lambda: pushgateway.runs_by_status() == expected, 30, what="counts")
    assert worker.stop() == 0  # warm shutdown
    runs = pushgateway.runs_by_status()
    assert runs == expected, runs
    # One cumulative group for the node, though a child was forked per wave.
    groups = cumulative_groups(pushgateway)
    assert len(groups) == 1 and groups[0]["instance"].startswith("w1@")
    g = pushgateway.group(job="celery", flow="shop", task="shop.flaky")
    assert g.value(f"{NS}_task_last_status", framework="celery", status="success") == 1
    assert g.value(f"{NS}_task_last_attempt") == 2
    g = pushgateway.group(job="celery", flow="shop", task="shop.fail")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert f"{NS}_task_last_failure_timestamp_seconds" in g.metrics
    h = pushgateway.group(job="celery", instance=groups[0]["instance"])
    assert h.value(f"{NS}_task_duration_seconds", task="shop.ok", status="success",
                   __count__="1") == 23


@pytest.mark.parametrize("pool", [["--pool", "threads", "-c", "4"], ["--pool", "solo"]])
def test_threads_and_solo_pools(pushgateway: Pushgateway, app, start_worker, pool) -> None:
    worker = start_worker(pushgateway.url, *pool)
    results = [app.ok.delay(i) for i in range(10)] + [app.fail.delay() for _ in range(2)]
    app.flaky.delay()  # its stored state can end RETRY with threads (a Celery race)
    wait_results(results, worker)
    expected = {"success": 11.0, "failed": 2.0, "retry": 1.0}
    wait_until(lambda: pushgateway.runs_by_status() == expected, 30, what="counts")
    assert worker.stop() == 0
    assert pushgateway.runs_by_status() == expected
    assert len(cumulative_groups(pushgateway)) == 1
    g = pushgateway.group(job="celery", flow="shop", task="shop.ok")
    assert 0 <= g.value(f"{NS}_task_last_duration_seconds") < 10


def test_revoked_and_hard_time_limit(pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "2")
    revoked = app.sleep.apply_async((0,), countdown=2)
    revoked.revoke()
    limited = app.hard_limit.delay()
    metas = wait_results([revoked, limited], worker)
    assert [m["status"] for m in metas] == ["REVOKED", "FAILURE"]
    # the parent reports both; wait for the push before stopping
    try:
        wait_until(lambda: pushgateway.runs_by_status().get("revoked") == 1
                   and pushgateway.runs_by_status().get("failed") == 1, 20, what="pushed")
    except AssertionError:
        raise AssertionError(f"{pushgateway.runs_by_status()}\n{worker.output()[-4000:]}") from None
    assert worker.stop() == 0
    assert pushgateway.runs_by_status() == {"revoked": 1.0, "failed": 1.0}  # no double count
    g = pushgateway.group(job="celery", flow="shop", task="shop.hard_limit")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert g.value(f"{NS}_task_last_duration_seconds") == 1.0  # the hard limit
    g = pushgateway.group(job="celery", flow="shop", task="shop.sleep")
    assert g.value(f"{NS}_task_last_status", status="revoked") == 1


def test_gateway_down_tasks_succeed_and_counts_arrive_later(app, start_worker) -> None:
    port = free_port()
    # No --max-tasks-per-child: recycling is the test above's, which avoids Celery's
    # race of a task handed to a recycling child (it stalls seconds, or never runs).
    worker = start_worker(f"http://127.0.0.1:{port}", "--pool", "prefork", "-c", "2")
    results = [app.ok.delay(i) for i in range(12)]
    assert [m["result"] for m in wait_results(results, worker)] == list(range(12))
    gw = start(port=port)
    try:
        # the sender's backoff is at most 30 s: the counts arrive within it
        wait_until(lambda: gw.runs_by_status() == {"success": 12.0}, 60,
                   what="counts after the gateway came up")
        assert worker.stop() == 0
        assert gw.runs_by_status() == {"success": 12.0}
    finally:
        gw.stop()


def test_worker_exit_with_gateway_down_spools_the_last_runs(app, start_worker,
                                                            tmp_path: object) -> None:
    port = free_port()
    spool = os.path.join(str(tmp_path), "spool")
    worker = start_worker(f"http://127.0.0.1:{port}", "--pool", "prefork", "-c", "2",
                          env={"ORCHESTRATOR_PUSH_SPOOL_DIR": spool,
                               "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "1"})
    results = [app.ok.delay(i) for i in range(6)]
    assert [m["result"] for m in wait_results(results, worker)] == list(range(6))
    assert worker.stop() == 0  # warm shutdown: cannot deliver, so it spools
    assert os.listdir(spool)
    gw = start(port=port)
    e = op.Engine(op.load_config({}, url=gw.url, spool_dir=spool, interval=0.05))
    try:
        e.record_flow(op.FlowRecord("exec", "replayer", "success", 1.0, 1.0))
        assert e.flush(30)
        g = gw.group(job="celery", flow="shop", task="shop.ok")
        assert g.value(f"{NS}_task_last_status", status="success") == 1
        assert e.stats().replayed == 6 and os.listdir(spool) == []
    finally:
        e.close(0)
        gw.stop()


def test_app_conf_settings(pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "solo",
                          env={"ORCHESTRATOR_PUSH_JOB": "shop-workers",
                               "ORCHESTRATOR_PUSH_LABELS": "env=test"})
    wait_results([app.ok.delay(1)], worker)
    assert worker.stop() == 0
    g = pushgateway.group(job="shop-workers", flow="shop", task="shop.ok", env="test")
    assert g.value(f"{NS}_task_last_status", status="success") == 1


def test_bucket_bounds_from_app_conf_in_a_prefork_worker(pushgateway: Pushgateway, app,
                                                         start_worker) -> None:
    """``app.conf.orchestrator_push_buckets = [0.5, 5.0]``: the node's histograms
    have those bounds and +Inf only, with each task's durations where the
    result backend's results put them (four quick ones, one of 0.6 s)."""
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "2",
                          env={"TEST_APP_CONF_BUCKETS": "0.5,5"})
    metas = wait_results([*(app.ok.delay(i) for i in range(4)), app.sleep.delay(0.6)], worker)
    assert [m["result"] for m in metas] == [0, 1, 2, 3, 0.6]
    assert worker.stop() == 0
    h = pushgateway.group(job="celery", instance=cumulative_groups(pushgateway)[0]["instance"])

    def buckets(task: str) -> dict[str, float]:
        [series] = [s for key, s in h.histogram(f"{NS}_task_duration_seconds").items()
                    if ("task", task) in key]
        return {k: v for k, v in series.items() if k not in ("count", "sum")}

    assert buckets("shop.ok") == {"0.5": 4, "5": 4, "+Inf": 4}
    assert buckets("shop.sleep") == {"0.5": 0, "5": 1, "+Inf": 1}


def test_a_record_a_pool_child_cannot_hand_over_is_counted_by_the_node(
        pushgateway: Pushgateway, app, start_worker) -> None:
    worker = start_worker(pushgateway.url, "--pool", "prefork", "-c", "1")
    # one child, so its pipe carries, in order: ok, the count of what it dropped, ok
    wait_results([app.too_long.delay()], worker)
    wait_results([app.ok.delay(1)], worker)
    wait_results([app.ok.delay(2)], worker)

    def dropped() -> float | None:
        try:
            g = pushgateway.group(job="celery", flow="shop", task="shop.ok")
            return g.value(f"{NS}_push_records_dropped_total", reason="relay_too_large")
        except KeyError:
            return None

    wait_until(lambda: dropped() == 1, 30, what="the child's loss in the node's self-metrics")
    assert worker.stop() == 0
    assert pushgateway.runs_by_status() == {"success": 2.0}


def test_restarts_of_the_gateway_and_of_the_worker(app, start_worker) -> None:
    """A gateway restarted without persistence gets the node's whole counts back
    with its next push (a gap, no decrease); a restarted worker counts again from
    zero (a counter reset, which Prometheus's rate() and increase() handle)."""
    port = free_port()
    gw = start(port=port)
    try:
        worker = start_worker(gw.url, "--pool", "prefork", "-c", "2")
        wait_results([app.ok.delay(i) for i in range(5)], worker)
        wait_until(lambda: gw.runs_by_status() == {"success": 5.0}, 30, what="5 counted")
        gw.stop()
        gw = start(port=port)  # persistence off: it starts empty
        reads: list[float] = []

        def counted(n: float) -> bool:
            value = gw.runs_by_status().get("success")
            if value is not None:
                reads.append(value)
            return value == n

        wait_until(lambda: counted(5.0), 30, what="the node's counts back at the new gateway")
        results = [app.ok.delay(i) for i in range(2)]
        wait_until(lambda: counted(7.0), 30, what="7 counted")
        wait_results(results, worker)
        assert reads == sorted(reads) and reads[0] == 5.0, reads  # never below what it had
        assert worker.stop() == 0
        assert gw.runs_by_status() == {"success": 7.0}
        worker = start_worker(gw.url, "--pool", "prefork", "-c", "2")  # the same node name
        wait_results([app.ok.delay(i) for i in range(3)], worker)
        wait_until(lambda: gw.runs_by_status() == {"success": 3.0}, 30,
                   what="the restarted node's own counts (a reset)")
        assert len(cumulative_groups(gw)) == 1
        assert worker.stop() == 0
    finally:
        gw.stop()
