"""What a Pushgateway costs as its groups grow: the numbers docs/operations.md quotes.

For each size, one real Pushgateway holds G task groups as orchestrator-push
pushes them (about ten last-run series each), with the gateway's consistency
check on (its default) and off, and we measure, side by side:
the scrape (GET /metrics: time and size, what Prometheus pays every interval),
one more push (POST of one group: what every task pays), the `status` command's
read (/api/v1/metrics), and the gateway's resident memory.

    .venv/bin/python bench/bench_gateway.py [--sizes 100,1000,2000]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import gateway

import orchestrator_push as op
from orchestrator_push import admin


def timed(fn: object, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(groups: int, check: bool) -> dict[str, object]:
    gw = gateway.start(extra_args=[] if check else ["--push.disable-consistency-check"])
    try:
        engine = op.Engine(op.load_config({}, url=gw.url, max_groups=groups + 10,
                                          max_queue=groups + 10))
        t0 = time.perf_counter()
        for i in range(groups):
            engine.record_task(op.TaskRecord("airflow", f"dag_{i // 10}", f"task_{i % 10}",
                                             "success", time.time(), 1.0))
        assert engine.flush(600)
        fill_s = time.perf_counter() - t0
        engine.close(0)
        body = gw.get("/metrics")
        scrape = timed(lambda: gw.get("/metrics"), 5)
        one = op.Engine(op.load_config({}, url=gw.url, interval=0.01))
        n = 0

        def push_one() -> None:
            nonlocal n
            n += 1
            one.record_task(op.TaskRecord("airflow", "dag_0", "task_0", "success", time.time(), n))
            assert one.flush(60)
        push = timed(push_one, 20)
        one.close(0)
        cfg = op.load_config({}, url=gw.url)
        status = timed(lambda: admin.status(cfg, io.StringIO(), as_json=True), 3)
        return {"groups": groups, "series": body.count(b"\n") - body.count(b"\n#"),
                "scrape_ms": scrape, "scrape_mib": len(body) / 2**20, "push_ms": push,
                "status_ms": status, "rss_mib": rss_mib(gw.proc.pid),
                "fill_groups_per_s": groups / fill_s}
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,2000")
    args = ap.parse_args()
    print("Pushgateway cost by number of groups (medians; one real gateway per row).")
    print("check: the gateway's consistency check of each push against every group "
          "(on by default; off: --push.disable-consistency-check)")
    print(f"{'groups':>7} {'check':>5} {'series':>8} {'scrape ms':>10} {'scrape MiB':>11} "
          f"{'1 push ms':>10} {'status ms':>10} {'RSS MiB':>8} {'fill groups/s':>14}", flush=True)
    for size in args.sizes.split(","):
        for check in (True, False):
            r = measure(int(size), check)
            print(f"{r['groups']:>7} {'on' if check else 'off':>5} {r['series']:>8} "
                  f"{r['scrape_ms']:>10.1f} {r['scrape_mib']:>11.2f} {r['push_ms']:>10.1f} "
                  f"{r['status_ms']:>10.1f} {r['rss_mib']:>8.0f} "
                  f"{r['fill_groups_per_s']:>14.0f}", flush=True)

if __name__ == "__main__":
    main()
