"""Counts for Prefect: flow runs in processes of their own, at once, on one host;
the gateway's sums equal Prefect's own record of every task run's attempts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

from gateway import Pushgateway, wait_until
from prefect_api import task_runs

NS = "orchestrator"
MAPPED = 200

SCRIPT = textwrap.dedent("""
    import os, sys
    from prefect import flow, task
    from prefect.futures import wait
    from orchestrator_push.prefect import instrument

    instrument()
    MARK = sys.argv[1]

    @task
    def square(i: int) -> int:
        if i % 25 == 0:
            raise ValueError(f"item {i} fails")
        return i * i

    @task(retries=1, retry_delay_seconds=0)
    def flaky() -> None:
        if not os.path.exists(MARK):  # the first attempt of this run fails
            open(MARK, "w").close()
            raise RuntimeError("first attempt fails")

    @flow(name="counted")
    def counted() -> None:
        futures = square.map(range(MAPPED_N))
        flaky()
        wait(futures)

    state = counted(return_state=True)
    print("FLOW_RUN", state.state_details.flow_run_id)
""").replace("MAPPED_N", str(MAPPED))


def _prefect_record(flow_run_ids: list[str]) -> tuple[dict[tuple[str, str], float],
                                                      dict[str, float]]:
    """Prefect's own record: each task run's final state and its run count
    (earlier attempts are retries), and each flow run's final state."""
    from prefect import get_client

    status = {"COMPLETED": "success", "FAILED": "failed"}

    def read() -> list[Any] | None:
        with get_client(sync_client=True) as client:
            runs = task_runs(client, flow_run_ids)
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        return done if len(done) == (MAPPED + 1) * len(flow_run_ids) else None

    runs = wait_until(read, 60, interval=0.5, what="every task run in Prefect's API")
    tasks: dict[tuple[str, str], float] = {}
    for r in runs:
        name = "square" if r.name.startswith("square") else "flaky"
        key = (name, status[r.state.type.value])
        tasks[key] = tasks.get(key, 0) + 1
        if r.run_count > 1:
            tasks[(name, "retry")] = tasks.get((name, "retry"), 0) + r.run_count - 1
    flows: dict[str, float] = {}
    with get_client(sync_client=True) as client:
        for fid in flow_run_ids:
            s = status[client.read_flow_run(fid).state.type.value]
            flows[s] = flows.get(s, 0) + 1
    return tasks, flows


def test_concurrent_flow_runs_count_exactly(pushgateway: Pushgateway, api_url: str,
                                            tmp_path: Any) -> None:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url, "PREFECT_API_URL": api_url,
           "ORCHESTRATOR_PUSH_SPOOL_DIR": str(tmp_path / "spool"),
           "ORCHESTRATOR_PUSH_BUCKETS": "1m"}
    env.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / f"mark{i}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=110)
        assert p.returncode == 0, err[-3000:]
        ids.append(next(x.split()[1] for x in out.splitlines() if x.startswith("FLOW_RUN ")))
    expected = _prefect_record(ids)
    # what the flow is written to do, so Prefect's record above is the one we mean
    assert expected[0] == {("square", "success"): 2 * 192, ("square", "failed"): 2 * 8,
                           ("flaky", "retry"): 2, ("flaky", "success"): 2}
    assert sum(expected[1].values()) == 2
    assert pushgateway.counted() == expected  # at exit of each process: no wait
    groups = [g.labels for g in pushgateway.groups() if f"{NS}_task_runs_total" in g.metrics]
    assert len(groups) == 1 and groups[0]["job"] == "prefect"
    # ORCHESTRATOR_PUSH_BUCKETS=1m: that bound and +Inf only, every attempt under a minute
    series = pushgateway.group(**groups[0]).histogram(f"{NS}_task_duration_seconds")
    assert sum(s["count"] for s in series.values()) == sum(expected[0].values())
    for s in series.values():
        assert set(s) == {"60", "+Inf", "count", "sum"} and s["60"] == s["count"]
