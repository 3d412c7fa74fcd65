"""Celery worker throughput: none vs instrument(app) vs a naive push_to_gateway in task_postrun.

Three long-lived solo workers (one per variant, each on its own queue) are started up
front on a real Redis broker, with a real Pushgateway. Each slice holds one worker on a
gate task, queues N no-op tasks and a marker behind it, releases the gate and times the
worker from release to marker. Variants alternate in short slices, the order flipped
every round; the table reports medians and the median of per-round ratios. Correctness:
the gateway's counted runs for the instrumented worker equal the tasks it ran.

    .venv/bin/python bench/bench_celery.py [--tasks 1000] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import gateway  # noqa: E402
import redis  # noqa: E402

VARIANTS = ("none", "instrument", "naive")


def taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="op-bench-")
    redis_server = gateway.RedisServer(prefix=taskset(1))
    url, r = redis_server.url, redis_server.client
    gw = gateway.start()
    workers = {}
    try:
        env = {**os.environ, "BENCH_REDIS_URL": url, "ORCHESTRATOR_PUSH_URL": gw.url,
               "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for v in VARIANTS:
            log = open(os.path.join(tmp, f"{v}.log"), "wb")
            workers[v] = subprocess.Popen(
                [*taskset(0), sys.executable, "-m", "celery", "-A", "celery_bench_app", "worker",
                 "--pool", "solo", "-Q", f"q_{v}", "-n", f"{v}@%h", "-l", "warning",
                 "--without-heartbeat", "--without-gossip", "--without-mingle"],
                env={**env, "BENCH_VARIANT": v}, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
        sys.path.insert(0, HERE)
        os.environ["BENCH_REDIS_URL"] = url
        from celery_bench_app import app

        # warm-up slice for each, not measured
        for v in VARIANTS:
            _slice(app, r, v, 200, "warm")
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        sent = dict.fromkeys(VARIANTS, 200 + 2)
        for rnd in range(a.rounds):
            order = VARIANTS if rnd % 2 == 0 else tuple(reversed(VARIANTS))
            for v in order:
                rates[v].append(a.tasks / _slice(app, r, v, a.tasks, f"r{rnd}"))
                sent[v] += a.tasks + 2
        # correctness: the instrumented worker's counts reach the gateway exactly
        expected = sent["instrument"]
        counted = gateway.wait_until(lambda: int(sum(gw.runs_by_status().values())) == expected and expected, 30,
                                     what="instrumented counts at the gateway")
    finally:
        for p in workers.values():
            p.terminate()
        for p in workers.values():
            p.wait(30)
        gw.stop()
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"# celery benchmark: solo workers, Redis broker, {a.tasks} no-op tasks per slice, "
          f"{a.rounds} rounds; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print("| variant | median tasks/s | min | max | ratio to none (median of rounds) | correct |")
    print("|---|---|---|---|---|---|")
    for v in VARIANTS:
        ratios = [x / n for x, n in zip(rates[v], rates["none"], strict=True)]
        correct = "yes" if v != "instrument" else f"yes ({counted} runs counted)"
        print(f"| {v} | {statistics.median(rates[v]):.0f} | {min(rates[v]):.0f} | "
              f"{max(rates[v]):.0f} | {statistics.median(ratios):.3f} | {correct} |")


def _slice(app, r: redis.Redis, variant: str, n: int, tag: str) -> float:  # type: ignore[no-untyped-def]
    key = f"gate:{variant}:{tag}"
    q = f"q_{variant}"
    app.send_task("bench.gate", (key,), queue=q)
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task("bench.noop", queue=q, producer=producer)
        app.send_task("bench.mark", (key,), queue=q, producer=producer)
    r.rpush(key, "go")
    gateway.wait_until(lambda: r.get(key + ":end"), 120, interval=0.01, what=f"slice {key}")
    return float(r.get(key + ":end")) - float(r.get(key + ":start"))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
