"""What a start signal costs: attempts recorded with and without their start, side
by side in one run, real Pushgateway.

Each measurement is its own process: N attempts over G tasks (the way a Celery
worker's main process records a start when a pool process accepts a request,
then the end), CPU per attempt of the whole process (sender included), and the
pushes the gateway counted for them. Rounds interleave the variants; the table
gives medians and the median of per-round differences. Correctness: every
task's group holds its newest completion, and (with starts) its newest start.

    python bench/bench_start.py [--attempts 100000] [--tasks 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gateway  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[5])
import orchestrator_push as op
url, n, tasks, tag, starts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[6] == "1"
e = op.Engine(op.load_config({}, url=url, interval=1.0, spool_dir="off"))
names = [f"t{i}" for i in range(tasks)]
cpu0 = time.process_time()
for i in range(n):
    name = names[i % tasks]
    if starts:
        e.record_start("celery", tag, name, at=1e9 + i, timeout=60.0)
    e.record_task(op.TaskRecord("celery", tag, name, "success", 1e9 + i + 0.5, 0.5))
ok = e.flush(60)
print(json.dumps({"cpu_us": (time.process_time() - cpu0) / n * 1e6, "ok": ok}))
e.close(1)
"""


def run(gw: gateway.Pushgateway, n: int, tasks: int, tag: str, starts: bool) -> dict[str, object]:
    before = gw.push_count()
    out = subprocess.run([sys.executable, "-c", CHILD, gw.url, str(n), str(tasks), tag, ROOT,
                          "1" if starts else "0"], capture_output=True, text=True, timeout=600,
                         check=True)
    row: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    row["pushes"] = gw.push_count() - before
    newest = {f"t{j}": max(i for i in range(n - tasks, n) if i % tasks == j) for j in range(tasks)}
    groups = {g.labels["task"]: g for g in gw.groups() if g.labels.get("flow") == tag}
    ok = bool(row["ok"]) and set(groups) == set(newest)
    for name, i in newest.items():
        g = groups.get(name)
        ok = ok and g is not None and g.value(
            "orchestrator_task_last_completion_timestamp_seconds") == 1e9 + i + 0.5
        if starts and g is not None:
            ok = ok and g.value("orchestrator_task_last_start_timestamp_seconds") == 1e9 + i
    row["correct"] = ok
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--attempts", type=int, default=100_000)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    variants = {"end only": False, "start + end": True}
    gw = gateway.start()
    rows: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    try:
        for rnd in range(a.rounds):
            order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
            for v in order:
                rows[v].append(run(gw, a.attempts, a.tasks, f"r{rnd}{int(variants[v])}",
                                   variants[v]))
    finally:
        gw.stop()
    print(f"# start signal: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; {a.attempts} "
          f"attempts over {a.tasks} tasks, {a.rounds} interleaved rounds")
    print("| variant | cpu_us/attempt | pushes (median) | correct |")
    print("|---|---|---|---|")
    for v, rs in rows.items():
        cpu = statistics.median(float(r["cpu_us"]) for r in rs)  # type: ignore[arg-type]
        pushes = statistics.median(float(r["pushes"]) for r in rs)  # type: ignore[arg-type]
        print(f"| {v} | {cpu:.2f} | {pushes:.0f} | {all(r['correct'] for r in rs)} |")
    added = statistics.median(float(s["cpu_us"]) - float(e["cpu_us"])  # type: ignore[arg-type]
                              for s, e in zip(rows["start + end"], rows["end only"], strict=True))
    print(f"\nadded by the start: {added:.2f} us per attempt (median of per-round differences); "
          f"target <= 1 us: {'met' if added <= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
