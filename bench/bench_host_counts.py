"""What counting on the host costs a short-lived process at exit: the exit flush of
one run with and without its count (host_counts.py), side by side, real Pushgateway.

Each round makes one engine per variant (as one `exec` does), records one run
and times ``flush_at_exit()``: the last-run push alone, or that plus the host
store (lock, read, add, fsync'd write, PUT of the totals). Rounds interleave the
variants; the table gives p50 and p99 of each and the median of per-round
differences. Correctness: the host group's count equals the rounds counted.
The store grows with the number of task names it holds (``--tasks``).

    python bench/bench_host_counts.py [--rounds 300] [--tasks 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import gateway  # noqa: E402

import orchestrator_push as op  # noqa: E402
from orchestrator_push import host_counts  # noqa: E402


def one_exit(url: str, spool: str, task: str, counted: bool) -> float:
    e = op.Engine(op.load_config({}, url=url, job="bench", interval=3600.0, spool_dir=spool))
    e.start()
    rec = op.TaskRecord("exec", "bench", task, "success", end_time=time.time(), duration=0.5)
    e.record_task(rec)
    if counted:
        e.count(rec)
    t0 = time.perf_counter()
    ok = e.flush_at_exit()
    took = time.perf_counter() - t0
    e.close(1)
    if not ok:
        raise RuntimeError("flush failed")
    return took


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--tasks", type=int, default=20)
    args = ap.parse_args()
    spool = tempfile.mkdtemp(prefix="bench-host-counts-")
    for gw in gateway.running():
        plain, counted, diffs = [], [], []
        for i in range(args.rounds):
            task = f"t{i % args.tasks}"
            a = one_exit(gw.url, spool, task, False)
            b = one_exit(gw.url, spool, task, True)
            if i % 2:  # the other order too: the machine drifts
                b2 = one_exit(gw.url, spool, task, True)
                a2 = one_exit(gw.url, spool, task, False)
                a, b = (a + a2) / 2, (b + b2) / 2
            plain.append(a)
            counted.append(b)
            diffs.append(b - a)
        expected = args.rounds + args.rounds // 2
        g = gw.group(job="bench", instance=host_counts.instance())
        total = sum(v for _, v in g.metrics["orchestrator_task_runs_total"])
        print(f"python {platform.python_version()}, {args.rounds} rounds, {args.tasks} task names")
        print(f"{'variant':<34} {'p50 ms':>8} {'p99 ms':>8}  correct")
        print(f"{'exit flush, last run only':<34} {pct(plain, 0.5) * 1e3:8.2f} "
              f"{pct(plain, 0.99) * 1e3:8.2f}  -")
        print(f"{'exit flush + host counts':<34} {pct(counted, 0.5) * 1e3:8.2f} "
              f"{pct(counted, 0.99) * 1e3:8.2f}  {total == expected} ({total:g}/{expected})")
        print(f"median per-round difference: {statistics.median(diffs) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
