"""Core benchmark against a real Pushgateway: cost on the caller's thread and pushes made.

Runs, in one process and one run:
  * orchestrator-push: record N attempts over G groups, then flush;
  * naive: prometheus_client.push_to_gateway once per attempt (what people hand-write).
Prints one table. A correctness column checks that the gateway holds what was sent.

    .venv/bin/python bench/bench_core.py [--records 100000] [--groups 10] [--naive 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import gateway
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

import orchestrator_push as op


def pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # ns -> us


def bench_engine(gw: gateway.Pushgateway, n: int, groups: int) -> dict[str, object]:
    engine = op.Engine(op.load_config({}, url=gw.url, interval=1.0, max_queue=n + 1))
    recs = [op.TaskRecord("celery", "bench", f"task-{i % groups}", "success", 1e9 + i, 0.01)
            for i in range(n)]
    engine.record_task(recs[0])  # start the sender outside the measurement
    assert engine.flush(10)
    before = gw.push_count()
    lat: list[int] = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for r in recs:
        t0 = clock()
        engine.record_task(r)
        lat.append(clock() - t0)
    recorded_in = time.perf_counter() - started
    ok = engine.flush(60)
    delivered_in = time.perf_counter() - started
    made = gw.push_count() - before
    engine.close(1)
    held = {g.labels["task"] for g in gw.groups() if g.labels.get("flow") == "bench"}
    correct = ok and held == {f"task-{i}" for i in range(groups)}
    return {"variant": "orchestrator-push", "records": n, "groups": groups,
            "p50_us": pct(lat, 0.50), "p99_us": pct(lat, 0.99), "max_us": max(lat) / 1000,
            "pushes": made, "caller_s": recorded_in, "delivered_s": delivered_in,
            "correct": correct}


def bench_naive(gw: gateway.Pushgateway, n: int, groups: int) -> dict[str, object]:
    lat: list[int] = []
    clock = time.perf_counter_ns
    before = gw.push_count()
    started = time.perf_counter()
    for i in range(n):
        t0 = clock()
        reg = CollectorRegistry()
        Gauge("orchestrator_task_last_duration_seconds", "d", registry=reg).set(0.01)
        Gauge("orchestrator_task_last_completion_timestamp_seconds", "c", registry=reg).set(1e9 + i)
        Gauge("orchestrator_task_last_success_timestamp_seconds", "s", registry=reg).set(1e9 + i)
        Gauge("orchestrator_task_last_attempt", "a", registry=reg).set(1)
        push_to_gateway(gw.url, job="naive", registry=reg,
                        grouping_key={"flow": "bench", "task": f"task-{i % groups}"})
        lat.append(clock() - t0)
    elapsed = time.perf_counter() - started
    made = gw.push_count() - before
    return {"variant": "naive push_to_gateway", "records": n, "groups": groups,
            "p50_us": pct(lat, 0.50), "p99_us": pct(lat, 0.99), "max_us": max(lat) / 1000,
            "pushes": made, "caller_s": elapsed, "delivered_s": elapsed, "correct": made == n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--naive", type=int, default=1_000, help="records for the naive variant")
    a = ap.parse_args()
    gw = gateway.start()
    try:
        rows = [bench_engine(gw, a.records, a.groups), bench_naive(gw, a.naive, a.groups),
                bench_engine(gw, a.naive, a.groups)]
    finally:
        gw.stop()
    print(f"# core benchmark: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    head = ["variant", "records", "groups", "p50_us", "p99_us", "max_us", "pushes", "caller_s",
            "delivered_s", "correct"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in head]
        print("| " + " | ".join(cells) + " |")
    naive, ours = rows[1], rows[2]
    print(f"\ncaller-thread time for {a.naive} records: naive {naive['caller_s']:.3f} s, "
          f"orchestrator-push {ours['caller_s']:.4f} s "
          f"({float(naive['caller_s']) / max(float(ours['caller_s']), 1e-9):.0f}x less)")
    print(f"record p99 target < 50 us: {'met' if float(rows[0]['p99_us']) < 50 else 'NOT met'}"
          f" ({rows[0]['p99_us']:.2f} us); pushes follow groups, not records: "
          f"{rows[0]['pushes']} pushes for {a.records} records in {a.groups} groups")


if __name__ == "__main__":
    main()
