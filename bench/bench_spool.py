"""The spool's costs, side by side, against a real Pushgateway (docs/performance.md).

For G groups: how long a process takes to spool what it could not deliver
(the exit path: gateway unreachable), how long the next process takes to
replay it, and what recording costs the caller once the queue is full (the
overflow goes to the spool) next to an ordinary record.

    .venv/bin/python bench/bench_spool.py [--groups 10,100,1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import gateway

import orchestrator_push as op


def records(groups: int, per_group: int = 3) -> list[op.TaskRecord]:
    return [op.TaskRecord("exec", f"flow{i % 50}", f"task{i}", "success", 1e9 + j, 1.0)
            for j in range(per_group) for i in range(groups)]


def spool_and_replay(gw: gateway.Pushgateway, groups: int) -> dict[str, float]:
    spool = tempfile.mkdtemp(prefix="op-bench-spool-")
    try:
        down = op.Engine(op.load_config({}, url=f"http://127.0.0.1:{gateway.free_port()}",
                                        spool_dir=spool, timeout=0.2, max_groups=groups + 1))
        for r in records(groups):
            down.record_task(r)
        t = time.perf_counter()
        assert down.flush(0.0)  # nothing can be delivered: all of it to the spool
        spool_ms = (time.perf_counter() - t) * 1000
        down.close(0)
        up = op.Engine(op.load_config({}, url=gw.url, spool_dir=spool))
        t = time.perf_counter()
        assert up.replay_spool()
        replay_ms = (time.perf_counter() - t) * 1000
        replayed = up.stats().replayed
        up.close(0)
        assert replayed == groups * 3, replayed
        return {"spool_ms": spool_ms, "replay_ms": replay_ms}
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def record_cost(stuck: bool, n: int = 5000) -> tuple[float, float]:
    """p50 and p99 of one record_task call, in microseconds."""
    spool = tempfile.mkdtemp(prefix="op-bench-spool-")
    try:
        # An unreachable gateway and a 60 s interval: the sender never drains the
        # queue during the measurement; max_queue decides whether records overflow.
        e = op.Engine(op.load_config({}, url=f"http://127.0.0.1:{gateway.free_port()}",
                                     spool_dir=spool, interval=60, timeout=0.2,
                                     max_queue=1 if stuck else n + 10))
        e.record_task(op.TaskRecord("exec", "f", "warm", "success", 1.0, 1.0))
        lat = []
        for i in range(n):
            r = op.TaskRecord("exec", "f", f"t{i % 10}", "success", 1e9 + i, 1.0)
            t = time.perf_counter_ns()
            e.record_task(r)
            lat.append(time.perf_counter_ns() - t)
        e.close(0)
        lat.sort()
        return lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def main() -> None:
    quiet = logging.getLogger("orchestrator_push")  # the spooling warnings are expected here
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", default="10,100,1000")
    args = ap.parse_args()
    gw = gateway.start()
    try:
        print("Spool: write at exit (gateway unreachable) and replay by the next process")
        print(f"{'groups':>7} {'records':>8} {'spool ms':>9} {'replay ms':>10}")
        for g in (int(x) for x in args.groups.split(",")):
            r = spool_and_replay(gw, g)
            print(f"{g:>7} {g * 3:>8} {r['spool_ms']:>9.1f} {r['replay_ms']:>10.1f}", flush=True)
    finally:
        gw.stop()
    print()
    print("record_task() on the caller's thread, microseconds")
    print(f"{'case':<40} {'p50':>7} {'p99':>7}")
    for name, stuck in (("queue has room (the normal case)", False),
                        ("queue full: overflow to the spool", True)):
        p50, p99 = record_cost(stuck)
        print(f"{name:<40} {p50:>7.1f} {p99:>7.1f}")


if __name__ == "__main__":
    main()
