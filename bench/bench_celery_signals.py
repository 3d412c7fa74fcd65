"""Celery's task_prerun/task_postrun signal pair, in process: what instrument(app) adds
per task, version 0.1 against this checkout, side by side in one run.

Each measurement is its own process (v0.1 from a git worktree of its commit): a
real Celery app and task, `instrument(app)` or not, then N prerun/postrun
pairs sent the way Celery's tracer sends them, then flush to a real
Pushgateway. CPU time is the whole process's (the sender thread included).
Rounds interleave the variants; the table gives medians and the added cost per
task against the uninstrumented run of the same round. Correctness: the
gateway's run count equals N.

    .venv/bin/python bench/bench_celery_signals.py [--tasks 100000] [--rounds 5]
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
sys.path.insert(0, HERE)

import gateway  # noqa: E402
from bench_record import worktree  # noqa: E402

CHILD = r"""
import json, os, sys, time, uuid
sys.path.insert(0, sys.argv[4])
from celery import Celery, signals
url, n, mode, src, node = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ.update(ORCHESTRATOR_PUSH_URL=url, ORCHESTRATOR_PUSH_SPOOL_DIR="off")
app = Celery("sigbench", broker="memory://")

@app.task(name="sigbench.noop")
def noop():
    return None

noop = noop._get_current_object()  # the tracer sends the task, not the app's proxy
if mode == "instrument":
    import orchestrator_push as op
    assert op.__file__.startswith(src), op.__file__
    from orchestrator_push.celery import instrument
    instrument(app)
    class Worker:  # the worker's main process starting (solo pool): it names the node
        hostname, pool_cls = node, "solo"
    signals.worker_init.send(sender=Worker())
ids = [uuid.uuid4().hex for _ in range(n)]
pre, post = signals.task_prerun.send, signals.task_postrun.send
cpu0 = time.process_time()
push, pop = noop.push_request, noop.pop_request
for tid in ids:  # as celery.app.trace does it: the request is on the stack around both
    push(id=tid, retries=0, hostname=node, args=(), kwargs={})
    pre(sender=noop, task_id=tid, task=noop, args=(), kwargs={})
    post(sender=noop, task_id=tid, task=noop, args=(), kwargs={}, retval=None, state="SUCCESS")
    pop()
ok = True
if mode == "instrument":
    import orchestrator_push as op
    ok = op.flush(60)
cpu = time.process_time() - cpu0
print(json.dumps({"cpu_us": cpu / n * 1e6, "ok": ok}))
"""


def run(src: str, mode: str, gw: gateway.Pushgateway, n: int, node: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD, gw.url, str(n), mode, src, node],
                         capture_output=True, text=True, timeout=600, check=True)
    row: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    if mode == "instrument":
        counted = sum(v for g in gw.groups() if g.labels.get("instance") == node
                      for lab, v in g.metrics.get("orchestrator_task_runs_total", []))
        row["correct"] = bool(row["ok"]) and counted == n
    else:
        row["correct"] = True
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    variants = {"none": (ROOT, "none"), "v0.1 instrument(app)": (worktree(), "instrument"),
                "this checkout instrument(app)": (ROOT, "instrument")}
    gw = gateway.start()
    rows: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
    try:
        for rnd in range(a.rounds):
            order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
            for v in order:
                src, mode = variants[v]
                rows[v].append(run(src, mode, gw, a.tasks, f"n{rnd}-{len(rows[v])}-{v[:4]}"))
    finally:
        gw.stop()
    print(f"# Celery signal pair: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; {a.tasks} "
          f"prerun/postrun pairs, {a.rounds} interleaved rounds")
    print("| variant | cpu_us/task | added_us/task (median of per-round differences) | correct |")
    print("|---|---|---|---|")
    base = rows["none"]
    for v, rs in rows.items():
        cpu = statistics.median(float(r["cpu_us"]) for r in rs)  # type: ignore[arg-type]
        added = statistics.median(float(r["cpu_us"]) - float(b["cpu_us"])  # type: ignore[arg-type]
                                  for r, b in zip(rs, base, strict=True))
        print(f"| {v} | {cpu:.2f} | {added:.2f} | {all(r['correct'] for r in rs)} |")
    new = statistics.median(float(r["cpu_us"]) - float(b["cpu_us"])  # type: ignore[arg-type]
                            for r, b in zip(rows["this checkout instrument(app)"], base,
                                            strict=True))
    print(f"\ntarget: at most 2 us added per task: {'met' if new <= 2 else 'NOT met'} "
          f"({new:.2f} us)")


if __name__ == "__main__":
    main()
