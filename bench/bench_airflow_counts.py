"""What counting a DAG run costs the scheduler: the listener's DAG-run end with and
without its counts, for a run of 1,000 task instances, side by side, real
Airflow database (sqlite), real Pushgateway.

Run it with the Python of a virtualenv that has Airflow and orchestrator-push:

    .nox/airflow-python-3-11-airflow-3-3/bin/python bench/bench_airflow_counts.py [--tis 1000] [--rounds 20] [--distinct]

Set-up: a fresh AIRFLOW_HOME, `airflow db migrate`, one `dag.test()` of a DAG
whose task is mapped over ``--tis`` items (reporting off), so Airflow's database
holds a finished run of that many task instances. Then, in one process, as the
scheduler's listener does when a DAG run ends: "last run only" pushes the DAG
run's own record; "+ counts" also reads every task instance (and the earlier
tries) of the run from Airflow's database and counts each in the host's store
(airflow.py ``_read_run``, ``_count``). Rounds interleave the variants; each round's
time is the listener call on the scheduler's thread (wall and CPU) and then the
flush that delivers it (the sender's work: host store and pushes). Correctness:
the host group's task count equals rounds x task instances.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gateway  # noqa: E402

DAG = textwrap.dedent("""
    import os, sys
    from datetime import datetime
    try:
        from airflow.sdk import DAG, task
    except ImportError:
        from airflow import DAG
        from airflow.decorators import task

    with DAG("bench_counts", start_date=datetime(2026, 1, 1), schedule=None, catchup=False,
             max_active_tasks=64) as dag:
        @task
        def item(x: int) -> None:
            return None

        n = int(os.environ["BENCH_TIS"])
        if os.environ.get("BENCH_DISTINCT") == "1":  # a task id each: the most series
            for i in range(n):
                item.override(task_id=f"t{i}")(i)
        else:
            item.expand(x=list(range(n)))

    if __name__ == "__main__":
        run = dag.test()
        print("RUN", run.state, len(run.get_task_instances()))
""")

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from sqlalchemy import select
    from airflow import settings
    from airflow.models import DagRun
    import orchestrator_push as op
    from orchestrator_push import airflow as adapter, runtime
    rounds = int(sys.argv[1])
    session = settings.Session()
    run = session.scalars(select(DagRun).where(DagRun.dag_id == "bench_counts")).one()
    real = adapter._read_run
    out = {"plain": [], "counted": []}
    for i in range(rounds):
        for variant in (("plain", "counted") if i % 2 == 0 else ("counted", "plain")):
            adapter._read_run = real if variant == "counted" else (lambda run: ([], []))
            w0, c0 = time.perf_counter(), time.process_time()
            adapter._record_dag_run(run, "success")
            w1, c1 = time.perf_counter(), time.process_time()
            ok = op.flush(60)
            w2, c2 = time.perf_counter(), time.process_time()
            out[variant].append({"listener_ms": (w1 - w0) * 1e3, "listener_cpu_ms": (c1 - c0) * 1e3,
                                 "flush_ms": (w2 - w1) * 1e3, "cpu_ms": (c2 - c0) * 1e3, "ok": ok})
    print("RESULT " + json.dumps(out))
""")


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def p99(rows: list[dict[str, float]], key: str) -> float:
    s = sorted(r[key] for r in rows)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tis", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--distinct", action="store_true",
                    help="a task id per task instance (the store's most series), not one "
                         "task mapped over them")
    a = ap.parse_args()
    import json

    home = tempfile.mkdtemp(prefix="bench-airflow-counts-")
    dags = os.path.join(home, "dags")
    os.makedirs(dags)
    with open(os.path.join(dags, "bench_counts.py"), "w") as f:
        f.write(DAG)
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_PUSH_")}
    env.update({"AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": dags, "BENCH_TIS": str(a.tis),
                "BENCH_DISTINCT": "1" if a.distinct else "0",
                "PATH": bindir + os.pathsep + env.get("PATH", ""),
                "AIRFLOW__CORE__MAX_MAP_LENGTH": str(max(1024, a.tis))})
    subprocess.run([os.path.join(bindir, "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=600)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, os.path.join(dags, "bench_counts.py")],
                       env={**env, "ORCHESTRATOR_PUSH_ENABLED": "false"}, capture_output=True,
                       text=True, timeout=3600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RUN ")), None)
    if p.returncode != 0 or line is None or int(line.split()[-1]) != a.tis:
        print(p.stdout[-2000:], p.stderr[-4000:])
        return 1
    setup = time.monotonic() - t0
    spool = os.path.join(home, "spool")
    for gw in gateway.running():
        q = subprocess.run([sys.executable, "-c", CHILD, str(a.rounds)],
                           env={**env, "ORCHESTRATOR_PUSH_URL": gw.url,
                                "ORCHESTRATOR_PUSH_SPOOL_DIR": spool,
                                "ORCHESTRATOR_PUSH_INTERVAL": "3600"},
                           capture_output=True, text=True, timeout=3600)
        res = next((x for x in q.stdout.splitlines() if x.startswith("RESULT ")), None)
        if q.returncode != 0 or res is None:
            print(q.stdout[-2000:], q.stderr[-4000:])
            return 1
        rows = json.loads(res.split(" ", 1)[1])
        counted = sum(v for g in gw.groups() if "orchestrator_task_runs_total" in g.metrics
                      for _, v in g.metrics["orchestrator_task_runs_total"])
        expected = a.rounds * a.tis
        ok = all(r["ok"] for rs in rows.values() for r in rs)
        import airflow
        print(f"# Airflow {airflow.__version__} scheduler-side counts: {platform.node()}, "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d')}; a DAG run of {a.tis} task instances "
              f"({'a task id each' if a.distinct else 'one task mapped'}; dag.test() set-up "
              f"{setup:.0f} s), {a.rounds} interleaved rounds")
        print("| variant | listener ms p50 | p99 | listener CPU ms p50 | flush ms p50 | "
              "process CPU ms p50 | correct |")
        print("|---|---|---|---|---|---|---|")
        for name, label in (("plain", "DAG run end, last run only"),
                            ("counted", "DAG run end + counts")):
            rs = rows[name]
            correct = f"{ok and counted == expected} ({counted:g}/{expected})" \
                if name == "counted" else str(ok)
            print(f"| {label} | {med(rs, 'listener_ms'):.1f} | {p99(rs, 'listener_ms'):.1f} | "
                  f"{med(rs, 'listener_cpu_ms'):.1f} | {med(rs, 'flush_ms'):.1f} | "
                  f"{med(rs, 'cpu_ms'):.1f} | {correct} |")
        added = statistics.median(c["cpu_ms"] - p["cpu_ms"]
                                  for c, p in zip(rows["counted"], rows["plain"], strict=True))
        print(f"\nadded by counting, per DAG run end: {added:.1f} ms of CPU "
              f"({added * 1e3 / a.tis:.0f} us per task instance; median of per-round "
              "differences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
