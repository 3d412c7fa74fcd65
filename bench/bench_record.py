"""The record path, version 0.1 (a queue of records folded by the sender) against this
checkout (folded on the caller's thread), side by side in one run, real Pushgateway.

Each variant runs in its own process (v0.1 from a git worktree of its commit):
N records over G groups in a tight loop, then flush. Reported per variant:
total CPU per record (time.process_time: the caller and the sender thread
together), records dropped and spooled, peak RSS before and after, and a
correctness column (the gateway holds the newest record of every group).
Rounds interleave the variants; the table gives medians and the median of
per-round ratios. A last run records 1,000,000 as fast as one thread can.

    .venv/bin/python bench/bench_record.py [--records 200000] [--groups 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gateway  # noqa: E402

OLD = "c4df313"  # version 0.1 as it landed

CHILD = r"""
import json, os, resource, sys, tempfile, time
sys.path.insert(0, sys.argv[5])  # before the editable install's own path
import orchestrator_push as op
assert op.__file__.startswith(sys.argv[5]), op.__file__
url, n, groups, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
POOL = min(n, 100_000)
spool = tempfile.mkdtemp(prefix="op-bench-spool-")
e = op.Engine(op.load_config({}, url=url, interval=1.0, spool_dir=spool))
# A pool of prebuilt records, cycled: the loop measures recording, not building
# records, and RSS before/after is not dominated by a million records.
pool = [op.TaskRecord("celery", tag, f"t{i % groups}", "success", 1e9 + i, 0.01)
        for i in range(min(n, POOL))]
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu0, wall0 = time.process_time(), time.perf_counter()
for i in range(n):
    e.record_task(pool[i % POOL])
caller_wall = time.perf_counter() - wall0
ok = e.flush(120)
cpu = time.process_time() - cpu0
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s = e.stats()
lost = sum(s.lost.values()) if hasattr(s, "lost") else (
    s.dropped_queue_full + s.dropped_too_many_groups + s.dropped_spool_full + s.rejected)
while os.listdir(spool) and e.flush(60):  # v0.1's overflow comes back from the spool
    pass
e.close(5)
print(json.dumps({"cpu_us": cpu / n * 1e6, "caller_us": caller_wall / n * 1e6, "ok": ok,
                  "dropped": lost, "spooled": s.spooled, "rss_before_mib": rss_before / 1024,
                  "rss_after_mib": rss_after / 1024}))
"""


def worktree() -> str:
    path = os.path.join(tempfile.gettempdir(), f"op-bench-{OLD}")
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, OLD],
                       check=True, capture_output=True)
    return path


def run(variant: str, src: str, gw: gateway.Pushgateway, n: int, groups: int,
        tag: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD, gw.url, str(n), str(groups), tag, src],
                         capture_output=True, text=True, timeout=600, check=True)
    row: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    held = {g.labels["task"]: g.value("orchestrator_task_last_completion_timestamp_seconds")
            for g in gw.groups() if g.labels.get("flow") == tag}
    pool = min(n, 100_000)
    newest = {f"t{j}": 1e9 + max(i for i in range(pool - groups, pool) if i % groups == j)
              for j in range(groups)}
    row["correct"] = bool(row["ok"]) and held == newest
    row["variant"] = variant
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--burst", type=int, default=1_000_000)
    a = ap.parse_args()
    variants = {"v0.1 (queue of records)": worktree(), "this checkout (fold on caller)": ROOT}
    gw = gateway.start()
    rows: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    try:
        for rnd in range(a.rounds):
            order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
            for v in order:
                rows[v].append(run(v, variants[v], gw, a.records, a.groups, f"r{rnd}{len(rows[v])}"
                                   + v.split()[0].replace(".", "")))
        burst = run("this checkout, burst", ROOT, gw, a.burst, a.groups, "burst")
    finally:
        gw.stop()
    print(f"# record path: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; "
          f"{a.records} records over {a.groups} groups, {a.rounds} interleaved rounds")
    head = ["variant", "cpu_us/record", "caller_us/record", "dropped", "spooled",
            "rss_before_mib", "rss_after_mib", "correct"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for v, rs in [*rows.items(), ("this checkout, 1M burst", [burst])]:
        med = {k: statistics.median(float(r[k]) for r in rs)  # type: ignore[arg-type]
               for k in ("cpu_us", "caller_us", "dropped", "spooled", "rss_before_mib",
                         "rss_after_mib")}
        print(f"| {v} | {med['cpu_us']:.2f} | {med['caller_us']:.2f} | {med['dropped']:.0f} | "
              f"{med['spooled']:.0f} | {med['rss_before_mib']:.1f} | {med['rss_after_mib']:.1f} | "
              f"{all(r['correct'] for r in rs)} |")
    old, new = (rows[v] for v in variants)
    ratio = statistics.median(float(o["cpu_us"]) / float(n["cpu_us"])  # type: ignore[arg-type]
                              for o, n in zip(old, new, strict=True))
    cpu = statistics.median(float(r["cpu_us"]) for r in new)  # type: ignore[arg-type]
    print(f"\nCPU per record: v0.1 / this checkout = {ratio:.1f}x (median of per-round ratios); "
          f"target <= 2 us at {a.groups} groups: {'met' if cpu <= 2 else 'NOT met'} ({cpu:.2f} us)")
    print(f"1M burst: dropped {burst['dropped']}, spooled {burst['spooled']}, "
          f"peak RSS {burst['rss_before_mib']:.1f} -> {burst['rss_after_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
