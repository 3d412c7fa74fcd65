"""A real prefork worker pushing to three real gateways, each group on two of
them (ORCHESTRATOR_PUSH_URL lists them, ORCHESTRATOR_PUSH_REPLICAS=2), one
gateway stopped while tasks run and started again: the path a deployment takes
(the worker's main process and its pool children)."""

from __future__ import annotations

from gateway import Pushgateway, start, wait_until
from test_celery import wait_results

from orchestrator_push import schema
from orchestrator_push.gateways import rank

NS = "orchestrator"


def ok_runs(gw: Pushgateway) -> float:
    """The gateway's count of shop.ok attempts that succeeded (its node group's)."""
    return gw.runs_by_status("shop.ok").get("success", 0.0)


def holds(gw: Pushgateway, labels: dict[str, str]) -> bool:
    return any(g.labels == labels for g in gw.groups())


def test_two_replicas_one_gateway_stopped_and_back(
        three: list[Pushgateway], app, start_worker) -> None:
    urls = [gw.url for gw in three]
    worker = start_worker(",".join(urls), "--pool", "prefork", "-c", "2",
                          env={"ORCHESTRATOR_PUSH_REPLICAS": "2"})
    wait_results([app.ok.delay(i) for i in range(5)], worker)
    task_key = {"job": "celery", "flow": "shop", "task": "shop.ok"}
    path = schema.group_path(tuple(task_key.items()))
    on = sorted(rank(urls, path)[:2])  # the task group's two gateways
    wait_until(lambda: [holds(gw, task_key) for gw in three] == [i in on for i in range(3)],
               20, what="the task group on exactly its two gateways")
    node = wait_until(lambda: next((g.labels for gw in three for g in gw.groups()
                                    if "instance" in g.labels), None), 20, what="the node group")
    node_key = (("job", node["job"]), *sorted((k, v) for k, v in node.items() if k != "job"))
    node_on = sorted(rank(urls, schema.group_path(node_key))[:2])
    wait_until(lambda: [ok_runs(three[i]) for i in node_on] == [5.0, 5.0], 20,
               what="5 attempts counted on the node group's replicas")

    # A gateway that holds both the task's group and the node's stops (two of
    # three each: they share one); the worker goes on.
    down = sorted(set(on) & set(node_on))[0]
    other = next(i for i in node_on if i != down)
    port, persisted = three[down].port, three[down].args
    three[down].stop()
    wait_results([app.ok.delay(i) for i in range(7)] + [app.fail.delay()], worker)
    wait_until(lambda: ok_runs(three[other]) == 12.0, 20,
               what="the other replica counts every attempt")
    assert three[other].runs_by_status("shop.fail") == {"failed": 1.0}
    alive = next(i for i in on if i != down)

    def last_done(gw: Pushgateway) -> float | None:
        g = next((g for g in gw.groups() if g.labels == task_key), None)
        return g.value(f"{NS}_task_last_completion_timestamp_seconds") if g else None

    newest = wait_until(lambda: last_done(three[alive]), 20, what="the task's last run")

    # Back, empty (no persistence): the worker sends it what it missed, the
    # task's last run (pushed once, while it was down) included.
    assert "--persistence.file=" in persisted
    three[down] = start(port=port)
    wait_until(lambda: ok_runs(three[down]) == 12.0, 40,
               what="the restarted gateway caught up with the node's counts")
    assert three[down].runs_by_status("shop.fail") == {"failed": 1.0}
    wait_until(lambda: last_done(three[down]) == newest, 40,
               what="the restarted gateway caught up with the task's last run")
    assert last_done(three[alive]) == newest  # no run since: the same last run
    assert worker.stop() == 0
    # Stopped cleanly: both replicas say so.
    for i in node_on:
        g = three[i].group(**node)
        assert g.value(f"{NS}_worker_up", role="celery-worker") == 0
