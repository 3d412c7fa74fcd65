"""How big a fleet one Pushgateway serves: N nodes pushing to one real gateway
that a real Prometheus scrapes every second, for growing N, with the gateway's
consistency check on (its default) and off, and with self-pacing off, side by
side in one run.

Two kinds of traffic:

- ``celery``: N long-lived nodes (each an Engine with its own sender, a few
  per load process), each running R attempts/s over M task types: a start and
  an end per attempt, counted in the node's counters group (label
  ``instance``) and folded into the M last-run groups that every node shares,
  as the Celery adapter does;
- ``airflow``: N hosts each starting short-lived runs (1/s), each run its own
  Engine that records its start and end and flushes as it ends (a task
  runner's exit flush), over M task types.

For each row: pushes/s the gateway handled, the client's push latency p50/p99,
the gateway's CPU (cores, from /proc) and resident memory, Prometheus's scrape
duration, series and the scrape's size, how stale the last-run values were as
Prometheus saw them (sampled each second during the load: now minus the newest
completion of a task, which runs many times a second fleet-wide), how far the
value the gateway kept is behind the fleet's newest (the gateway keeps the last
write of a group the nodes share), the records not yet delivered when the load
stopped, and correctness: after a final flush, every task group holds one node's
newest completion and the counters groups hold exactly the attempts recorded.
While the load runs only Prometheus reads the gateway.

Celery traffic also runs over several gateways (``--spread``, 3 by default:
ORCHESTRATOR_PUSH_URL lists them, each group on one), the check on: the
columns then add up the gateways (cores, memory, scrape size, series) or take
the slowest (scrape duration).

Celery traffic also runs with fewer histogram buckets (``--buckets``,
ORCHESTRATOR_PUSH_BUCKETS; 0.1,1,10,60 by default), the check on: a node's
group is mostly its two duration histograms.

Then a recovery run: 50 nodes with the check on, past the knee, then nine in
ten stop cleanly and their groups are deleted; a timeline of pushes/s and the
push interval of the running nodes shows them come back to the configured one.

    python bench/bench_fleet.py [--nodes 5,20,50,100] [--kinds celery,airflow]
                                [--tasks 20] [--rate 5] [--airflow-rate 1] [--seconds 15]
                                [--spread 3] [--buckets 0.1,1,10,60] [--recovery-nodes 50]
                                [--rounds 1] [--variants all|buckets]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gateway  # noqa: E402

NS = "orchestrator"
TICK = 0.05  # the load loop's step: R attempts/s per node are spread over steps

LOAD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import orchestrator_push as op
from orchestrator_push import gateways
from orchestrator_push.transport import HttpTransport, connect

url, kind, first, count, tasks, rate, seconds, interval = (
    sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
    float(sys.argv[7]), float(sys.argv[8]), float(sys.argv[9]))
TICK = float(sys.argv[10])
if sys.argv[11] == "0":  # self-pacing off: the interval stays the configured one
    import orchestrator_push.sender
    orchestrator_push.sender.MAX_PACED_INTERVAL = 0.0
DROP = float(sys.argv[12])  # then nine nodes in ten stop (a fleet scaled down; 0: never)
BUCKETS = {} if sys.argv[13] == "default" else {"buckets": sys.argv[13]}
latencies = []
lat_lock = threading.Lock()

class Timed(HttpTransport):
    def request(self, method, path, body=b"", content_type=None):
        t0 = time.perf_counter()
        out = super().request(method, path, body, content_type)
        with lat_lock:
            latencies.append(time.perf_counter() - t0)
        return out

gateways.HttpTransport = Timed  # several gateways: each one's requests timed too
TRANSPORT = connect if "," in url else Timed

def config():
    return op.load_config({}, url=url, interval=interval, spool_dir="off", job="fleet",
                          flush_timeout=30.0, **BUCKETS)

names = [f"t{j}" for j in range(tasks)]
newest = {}  # "node task" -> newest end time recorded (a host's runs: "host task")
attempts = {}  # node -> attempts recorded
TR = op.TaskRecord

def celery():
    nodes = [(f"node{first + i}", op.Engine(config(), transport=TRANSPORT)) for i in range(count)]
    for name, e in nodes:
        e.register_node((("instance", name),), "celery", "worker")
        attempts[name] = 0
    def stop(name, e):  # a clean stop, as the Celery adapter's: it delivers
        e.node_down((("instance", name),), "celery")
        e.close(30)

    start = time.monotonic()
    i = 0  # attempts so far on each node
    dropped = []
    while (elapsed := time.monotonic() - start) < seconds:
        if DROP and elapsed > DROP and not dropped:  # at once, each on its own
            dropped = [threading.Thread(target=stop, args=(name, e))
                       for name, e in nodes if int(name[4:]) % 10]
            for t in dropped:
                t.start()
            nodes = [(name, e) for name, e in nodes if int(name[4:]) % 10 == 0]
        while i < int(rate * elapsed) + 1:  # R/s per node, spread over the steps
            for name, e in nodes:
                task = names[(i + int(name[4:])) % tasks]
                now = time.time()
                e.record_start("celery", "fleet", task, at=now - 0.01)
                e.record_task(TR("celery", "fleet", task, "success", now, 0.01),
                              cumulative=(("instance", name),))
                newest[f"{name} {task}"] = now
                attempts[name] += 1
            i += 1
        time.sleep(TICK)
    for t in dropped:
        t.join(60)
    pending = sum(e.pending() for _, e in nodes)
    ok = all(e.flush(60) for _, e in nodes)
    for _, e in nodes:
        e.close(5)
    return pending, ok

def airflow():
    # each host: runs started at R/s, each its own engine, one flush as it ends
    lock = threading.Lock()
    oks = []
    def run(task, k):
        e = op.Engine(config(), transport=TRANSPORT)
        now = time.time()
        e.record_start("airflow", "fleet", task, at=now - 0.01)
        e.record_task(TR("airflow", "fleet", task, "success", now, 0.01))
        ok = e.flush(30)
        e.close(1)
        with lock:
            oks.append(ok)
            key = f"host{first + k % count} {task}"
            newest[key] = max(newest.get(key, 0.0), now)
    threads = []
    k = 0  # runs started on this process's hosts
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        while k < int(rate * count * elapsed) + 1:
            t = threading.Thread(target=run, args=(names[k % tasks], k))
            t.start()
            threads.append(t)
            k += 1
        threads = [t for t in threads if t.is_alive()]
        time.sleep(TICK)
    for t in threads:
        t.join(60)
    attempts["runs"] = k
    return 0, all(oks) and len(oks) == k

pending, ok = celery() if kind == "celery" else airflow()
latencies.sort()
print(json.dumps({"latencies": latencies, "newest": newest, "attempts": attempts,
                  "pending": pending, "ok": ok}))
"""


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def last_completions(gws: list[gateway.Pushgateway]) -> dict[str, float]:
    """Each task's newest completion the gateways hold (its last-run groups)."""
    out: dict[str, float] = {}
    for g in (g for gw in gws for g in gw.groups()):
        if g.labels.get("job") == "fleet" and "task" in g.labels:
            for _, v in g.metrics.get(f"{NS}_task_last_completion_timestamp_seconds", []):
                out[g.labels["task"]] = max(out.get(g.labels["task"], 0.0), v)
    return out


#: Pushes per second the gateway handled (its own counter, as Prometheus scraped it).
PUSH_RATE = 'sum(rate(pushgateway_http_requests_total{{handler="push"}}[{window}]))'
#: The push interval each running node said in its last push (its own group).
RUNNING_INTERVALS = ('orchestrator_push_interval_seconds{job="fleet", instance!=""} '
                     'and on (instance) (orchestrator_worker_up{job="fleet"} == 1)')


def prom_values(prom: gateway.Prometheus, expr: str) -> list[tuple[dict[str, str], float]]:
    return [(r["metric"], float(r["value"][1])) for r in prom.query(expr)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def row(kind: str, nodes: int, check: bool, pacing: bool, a: argparse.Namespace,
        drop: float = 0.0, timeline: list[tuple[float, float, float, float]] | None = None,
        spread: int = 1, buckets: str = "default") -> dict[str, object]:
    """``spread`` gateways (ORCHESTRATOR_PUSH_URL lists them, one replica each);
    ``buckets``: ORCHESTRATOR_PUSH_BUCKETS."""
    gws = [gateway.start(extra_args=[] if check else ["--push.disable-consistency-check"])
           for _ in range(spread)]
    gw = gws[0]
    urls = ",".join(g.url for g in gws)
    prom = gateway.Prometheus(urls)
    try:
        procs = max(1, min(a.procs, nodes))
        share = [nodes // procs + (1 if i < nodes % procs else 0) for i in range(procs)]
        firsts = [sum(share[:i]) for i in range(procs)]
        seconds = a.seconds + (a.seconds * 4 if drop else 0)
        cpu0, t0 = sum(proc_cpu(g.proc.pid) for g in gws), time.monotonic()
        loads = [subprocess.Popen(
            [sys.executable, "-c", LOAD, ROOT, urls, kind, str(first), str(n), str(a.tasks),
             str(a.rate if kind == "celery" else a.airflow_rate), str(seconds), str(a.interval),
             str(TICK), "1" if pacing else "0", str(drop), buckets],
            stdout=subprocess.PIPE, text=True) for first, n in zip(firsts, share, strict=True)]
        stale: list[float] = []
        done = threading.Event()
        deleted: set[str] = set()

        # While the load runs only Prometheus reads the gateway (as in a real
        # deployment): reading it ourselves, 6 MB a second at 100 nodes, would
        # load it as much as a second Prometheus.
        def sample() -> None:  # staleness while the load runs, after a warm-up
            if done.wait(min(3.0, a.seconds / 3)):
                return
            while not done.wait(1.0):
                stale.extend(v for _, v in prom_values(
                    prom, 'time() - max by (task) '
                    '(orchestrator_task_last_completion_timestamp_seconds{job="fleet"})'))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if timeline is None:
            time.sleep(seconds)  # the load's own length: it stops by itself
        else:  # every 2 s: pushes/s, and the push intervals the running nodes last sent
            while time.monotonic() - t0 < seconds - 1:
                time.sleep(2.0)
                if not deleted and time.monotonic() - t0 > drop:
                    # the operator removes the stopped nodes' groups (`orchestrator-push
                    # delete`), once they said they stopped: with the check on, every
                    # push costs in proportion to what the gateway holds
                    down = [m["instance"] for m, _ in prom_values(
                        prom, 'orchestrator_worker_up{job="fleet"} == 0')]
                    if len(down) >= nodes - (nodes + 9) // 10:
                        for inst in down:
                            req = urllib.request.Request(
                                f"{gw.url}/metrics/job/fleet/instance/{inst}", method="DELETE")
                            urllib.request.urlopen(req, timeout=60).close()
                        deleted.update(down)
                        timeline.append((time.monotonic() - t0 - drop, -1.0, 0.0, 0.0))
                rate = prom_values(prom, PUSH_RATE.format(window="3s"))
                intervals = [v for _, v in prom_values(prom, RUNNING_INTERVALS)]
                timeline.append((time.monotonic() - t0 - drop, rate[0][1] if rate else 0.0,
                                 statistics.median(intervals) if intervals else 0.0,
                                 max(intervals, default=0.0)))
        t1 = time.monotonic()
        pushed = prom_values(prom, PUSH_RATE.format(window=f"{max(2, int(t1 - t0 - 2))}s"))
        cpu1 = sum(proc_cpu(g.proc.pid) for g in gws)
        rss = sum(proc_rss_mib(g.proc.pid) for g in gws)
        done.set()
        outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in loads]
        sampler.join(10)
        scrape = prom.query(
            'max(avg_over_time(scrape_duration_seconds{job="pushgateway"}[30s]))')
        samples = prom.query('sum(scrape_samples_scraped{job="pushgateway"})')
        size = 0
        for g in gws:
            with urllib.request.urlopen(g.url + "/metrics", timeout=30) as r:
                size += len(r.read())
        lat = sorted(x for o in outs for x in o["latencies"])
        # Each node pushes the last-run groups it shares with every node: the
        # gateway keeps the last write, which is one node's newest, within about
        # one push interval of the fleet's newest.
        by_task: dict[str, list[float]] = {}
        for o in outs:
            for key, v in o["newest"].items():
                by_task.setdefault(key.split(" ", 1)[1], []).append(v)
        held = last_completions(gws)
        correct = all(o["ok"] for o in outs) and set(held) == set(by_task) and all(
            any(abs(held[t] - v) < 1e-3 for v in vs) for t, vs in by_task.items())
        behind = max(max(vs) - held.get(t, 0.0) for t, vs in by_task.items())
        if kind == "celery":
            counted = {g.labels["instance"]: sum(v for _, v in
                                                 g.metrics.get(f"{NS}_task_runs_total", []))
                       for gw in gws for g in gw.groups() if "instance" in g.labels}
            recorded = {n: c for o in outs for n, c in o["attempts"].items() if n not in deleted}
            if counted != recorded:
                print("counted", counted, "recorded", recorded, file=sys.stderr)
            correct = correct and counted == recorded
            made = sum(recorded.values())
        else:
            made = sum(o["attempts"]["runs"] for o in outs)
        return {
            "kind": kind, "nodes": nodes, "gateways": spread, "buckets": buckets,
            "check": "on" if check else "off",
            "pacing": "on" if pacing else "off",
            "attempts/s": made / seconds,
            "pushes/s": pushed[0][1] if pushed else float("nan"),
            "p50 ms": percentile(lat, 0.5) * 1e3, "p99 ms": percentile(lat, 0.99) * 1e3,
            "gw cores": (cpu1 - cpu0) / (t1 - t0), "gw MiB": rss,
            "scrape ms": float(scrape[0]["value"][1]) * 1e3 if scrape else float("nan"),
            "series": int(float(samples[0]["value"][1])) if samples else 0,
            "scrape KiB": size / 1024,
            "stale p50 s": statistics.median(stale) if stale else float("nan"),
            "stale p99 s": percentile(sorted(stale), 0.99),
            "held behind newest s": behind,
            "undelivered at stop": sum(o["pending"] for o in outs),
            "correct": correct,
        }
    finally:
        prom.stop()
        for g in gws:
            g.stop()


def median_row(rs: list[dict[str, object]]) -> dict[str, object]:
    """One variant's rounds: the median of each measure, correct if every round was."""
    out = dict(rs[0])
    for key, value in rs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(float(r[key]) for r in rs)  # type: ignore[arg-type]
        elif isinstance(value, bool):
            out[key] = all(r[key] for r in rs)
        elif isinstance(value, int) and key != "nodes" and key != "gateways":
            out[key] = int(statistics.median(int(r[key]) for r in rs))  # type: ignore[call-overload]
    out["rounds"] = len(rs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", default="5,20,50,100")
    ap.add_argument("--kinds", default="celery,airflow")
    ap.add_argument("--tasks", type=int, default=20, help="task types (M)")
    ap.add_argument("--rate", type=float, default=5.0, help="celery: attempts/s per node (R)")
    ap.add_argument("--airflow-rate", type=float, default=1.0,
                    help="airflow: runs started per second per host")
    ap.add_argument("--seconds", type=float, default=15.0, help="load per row")
    ap.add_argument("--interval", type=float, default=1.0, help="ORCHESTRATOR_PUSH_INTERVAL")
    ap.add_argument("--procs", type=int, default=4, help="load processes per row")
    ap.add_argument("--spread", type=int, default=3,
                    help="celery: also this many gateways (check on; 1: not)")
    ap.add_argument("--buckets", default="0.1,1,10,60",
                    help="celery: also with these bucket bounds (check on; 'default': not)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of each variant, interleaved; a row is their median")
    ap.add_argument("--variants", choices=("all", "buckets"), default="all",
                    help="buckets: only default bounds against --buckets, check on and off")
    ap.add_argument("--recovery-nodes", type=int, default=50,
                    help="nodes of the recovery run (consistency check on), before nine in ten stop")
    a = ap.parse_args()
    rows = []
    for kind in a.kinds.split(","):
        for i, n in enumerate(int(x) for x in a.nodes.split(",")):
            variants = [(True, True, 1, "default"), (False, True, 1, "default")]
            if kind == "celery" and a.variants == "buckets":  # the bucket set, check on and off
                variants += [(True, True, 1, a.buckets), (False, True, 1, a.buckets)]
            elif kind == "celery":  # short-lived runs flush as they end: no interval to pace
                variants.append((True, False, 1, "default"))
                if a.spread > 1:
                    variants.append((True, True, a.spread, "default"))
                if a.buckets != "default":  # a node's histograms are most of its group
                    variants.append((True, True, 1, a.buckets))
            # the variants side by side, their order alternating; a variant's
            # row is the median of its rounds
            runs: dict[tuple[bool, bool, int, str], list[dict[str, object]]] = {}
            for k in range(a.rounds):
                for v in (variants if (i + k) % 2 == 0 else variants[::-1]):
                    check, pacing, spread, buckets = v
                    r = row(kind, n, check, pacing, a, spread=spread, buckets=buckets)
                    runs.setdefault(v, []).append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
            rows += [median_row(rs) for rs in runs.values()]
    timeline: list[tuple[float, float, float, float]] = []
    if "celery" in a.kinds and a.recovery_nodes:
        biggest = a.recovery_nodes
        recovery = row("celery", biggest, True, True, a, drop=a.seconds, timeline=timeline)
        print(json.dumps(recovery), file=sys.stderr, flush=True)
    print(f"# fleet: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}; {a.tasks} task types, "
          f"celery {a.rate:g} attempts/s per node, airflow {a.airflow_rate:g} runs/s per host, {a.seconds:g} s per row, push interval "
          f"{a.interval:g} s, Prometheus scraping every 1 s")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in sorted(rows, key=lambda r: (r["kind"], r["nodes"], r["gateways"], r["buckets"],
                                         r["check"], r["pacing"])):
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v)
                                for v in r.values()) + " |")
    if timeline:
        print(f"\nrecovery: {biggest} celery nodes, consistency check on, for {a.seconds:g} s; "
              f"then nine nodes in ten stop cleanly, for {4 * a.seconds:g} s "
              f"(correct: {recovery['correct']})")
        print("| seconds after the drop | pushes/s | push interval of the running nodes, median (s) | max (s) |")
        print("|---|---|---|---|")
        for t, rate, med, top in timeline:
            if rate < 0:
                print(f"| {t:.0f} | the stopped nodes' groups deleted | | |")
            else:
                print(f"| {t:.0f} | {rate:.0f} | {med:.1f} | {top:.1f} |")


if __name__ == "__main__":
    main()
