"""What a start signal costs: attempts recorded with and without their start, side
by side in one run, real Pushgateway.

N attempts over G tasks, the way a Celery worker's main process records a
start when a pool process accepts a request, then the end. Two measures:

- in one process (the target's measure): blocks of N attempts with and without
  starts, alternating, CPU of the recording loop per block; the added cost is the
  median of per-round differences, so the machine's drift between rounds cancels;
- whole process: each variant in its own process, CPU per attempt of the whole
  process (sender and flush included) and the pushes the gateway counted.

Correctness: every task's group holds its newest completion, and (with starts)
its newest start.

    python bench/bench_start.py [--attempts 100000] [--tasks 20] [--rounds 5]
                                [--pair-attempts 10000] [--pair-rounds 101]
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

PAIRS = r"""
import json, sys, time
sys.path.insert(0, sys.argv[4])
import orchestrator_push as op
url, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
e = op.Engine(op.load_config({}, url=url, interval=1.0, spool_dir="off"))
names = [f"t{i}" for i in range(20)]
TR = op.TaskRecord

def block(tag, starts, t0):
    cpu0 = time.thread_time()
    for i in range(n):
        name = names[i % 20]
        if starts:
            e.record_start("celery", tag, name, at=t0 + i, timeout=60.0)
        e.record_task(TR("celery", tag, name, "success", t0 + i + 0.5, 0.5))
    return (time.thread_time() - cpu0) / n * 1e6

out = []
for r in range(rounds):
    order = (False, True) if r % 2 == 0 else (True, False)
    cpu = {s: block(f"p{int(s)}", s, 1e9 + r * n) for s in order}
    out.append([cpu[False], cpu[True]])
print(json.dumps({"rounds": out, "ok": e.flush(60)}))
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


def in_process(gw: gateway.Pushgateway, n: int, rounds: int) -> tuple[list[list[float]], bool]:
    """Per round [end only, start + end] CPU per attempt, and whether every group
    holds its newest values."""
    out = subprocess.run([sys.executable, "-c", PAIRS, gw.url, str(n), str(rounds), ROOT],
                         capture_output=True, text=True, timeout=600, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    groups = {(g.labels.get("flow"), g.labels.get("task")): g for g in gw.groups()}
    ok = bool(res["ok"])
    last = (rounds - 1) * n  # each variant's flow: its newest values are the last round's
    for s in (0, 1):
        for j in range(20):
            i = last + max(i for i in range(n - 20, n) if i % 20 == j)
            g = groups.get((f"p{s}", f"t{j}"))
            ok = ok and g is not None and g.value(
                "orchestrator_task_last_completion_timestamp_seconds") == 1e9 + i + 0.5
            if s and g is not None:
                ok = ok and g.value("orchestrator_task_last_start_timestamp_seconds") == 1e9 + i
    return res["rounds"], ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--attempts", type=int, default=100_000)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    # short blocks, many rounds: the machine's drift (seconds) stays out of a round
    ap.add_argument("--pair-attempts", type=int, default=10_000,
                    help="attempts per block of the in-process measure")
    ap.add_argument("--pair-rounds", type=int, default=101, help="rounds of the in-process measure")
    a = ap.parse_args()
    variants = {"end only": False, "start + end": True}
    gw = gateway.start()
    rows: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    try:
        pairs, pairs_ok = in_process(gw, a.pair_attempts, a.pair_rounds)
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
    diffs = [s - e for e, s in pairs]
    added_in = statistics.median(diffs)
    print(f"\nin one process, {a.pair_rounds} interleaved rounds of {a.pair_attempts} attempts:")
    print("| variant | cpu_us/attempt (median) | correct |")
    print("|---|---|---|")
    print(f"| end only | {statistics.median(e for e, _ in pairs):.2f} | {pairs_ok} |")
    print(f"| start + end | {statistics.median(s for _, s in pairs):.2f} | {pairs_ok} |")
    print(f"\nadded by the start: {added_in:.2f} us per attempt (median of per-round "
          f"differences; quartiles {statistics.quantiles(diffs, n=4)[0]:.2f} to "
          f"{statistics.quantiles(diffs, n=4)[2]:.2f}); target <= 1 us: "
          f"{'met' if added_in <= 1 else 'NOT met'}")
    print(f"\nwhole process, {a.rounds} interleaved rounds:")
    print("| variant | cpu_us/attempt | pushes (median) | correct |")
    print("|---|---|---|---|")
    for v, rs in rows.items():
        cpu = statistics.median(float(r["cpu_us"]) for r in rs)  # type: ignore[arg-type]
        pushes = statistics.median(float(r["pushes"]) for r in rs)  # type: ignore[arg-type]
        print(f"| {v} | {cpu:.2f} | {pushes:.0f} | {all(r['correct'] for r in rs)} |")
    added = statistics.median(float(s["cpu_us"]) - float(e["cpu_us"])  # type: ignore[arg-type]
                              for s, e in zip(rows["start + end"], rows["end only"], strict=True))
    print(f"\nadded by the start: {added:.2f} us per attempt (median of per-round differences; "
          "this also counts the sender's thread and the flush)")


if __name__ == "__main__":
    main()
