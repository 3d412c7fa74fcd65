"""What reading the DAGs' schedules costs a scheduler with thousands of DAGs:
the scheduler-side reader (airflow_schedules.py) on a real Airflow database
(sqlite) with ``--dags`` scheduled DAGs, pushing to a real Pushgateway.

Run it with the Python of a virtualenv that has Airflow and orchestrator-push:

    /path/to/airflow-venv/bin/python bench/bench_airflow_schedules.py [--dags 5000] [--rounds 11]

Set-up: a fresh AIRFLOW_HOME, `airflow db migrate`, then ``--dags`` rows in the
``dag`` table, each with a next run (a tenth of them paused). Measured, in one
process:

1. one read of the dag table (``airflow_schedules.read``: the query the
   reader's thread runs every 10 s), p50 and p99 over the rounds, and one
   read of a single DAG's row (what a DAG run's start wakes it for, at most
   once a second);
2. a scheduler-like loop on the main thread (small queries of the same
   database, as the scheduler's loop makes) for 2 s, with the reader's thread
   polling every 0.5 s (20 times more often than it does) and without it,
   interleaved; the median of the per-round ratios of loop iterations is the
   slowdown at that rate, divided by 20 the one at the real rate.

The reader's first polls record every DAG (half the group cap per poll; their
push of thousands of groups is not part of the rounds); later ones find
nothing changed, as in a steady scheduler. Correctness: the gateway holds a next run for every unpaused DAG
and none for the paused ones (the grace alone).
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
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import gateway  # noqa: E402

CHILD = textwrap.dedent("""
    import json, statistics, sys, threading, time
    from datetime import datetime, timedelta, timezone
    from sqlalchemy import select
    from airflow import settings
    from airflow.models.dag import DagModel
    from orchestrator_push import airflow_schedules as reader, runtime
    from orchestrator_push.schedule_watch import Poller, ScheduleRecorder

    n, rounds = int(sys.argv[1]), int(sys.argv[2])
    session = settings.Session()
    if hasattr(DagModel, "bundle_name"):  # Airflow 3: every DAG belongs to a bundle
        from airflow.models.dagbundle import DagBundleModel
        session.add(DagBundleModel(name="bench"))
        session.flush()
    due = datetime(2030, 1, 1, tzinfo=timezone.utc)
    for i in range(n):
        extra = {"bundle_name": "bench", "is_stale": False} if hasattr(DagModel, "bundle_name") \\
            else {"is_active": True}
        session.add(DagModel(dag_id=f"dag_{i:05d}", is_paused=(i % 10 == 0),
                             next_dagrun_create_after=due + timedelta(minutes=i),
                             next_dagrun_data_interval_start=due,
                             next_dagrun_data_interval_end=due + timedelta(hours=1), **extra))
    session.commit()

    reads = []
    for _ in range(rounds):
        s = settings.Session.session_factory()
        t0 = time.perf_counter()
        got = reader.read(s)
        reads.append((time.perf_counter() - t0) * 1e3)
        s.close()
    assert len(got) == n, len(got)
    woken = []  # a DAG run started: the reader reads that DAG's row alone
    for i in range(rounds):
        s = settings.Session.session_factory()
        t0 = time.perf_counter()
        one = reader.read(s, [f"dag_{i:05d}"])
        woken.append((time.perf_counter() - t0) * 1e3)
        s.close()
        assert list(one) == [(f"dag_{i:05d}", None)], one

    def loop(seconds):
        s = settings.Session.session_factory()
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            s.execute(select(DagModel.dag_id).where(DagModel.dag_id == f"dag_{count % n:05d}")).all()
            count += 1
        s.close()
        return count

    engine = runtime.get_engine()
    recorder = ScheduleRecorder(engine, "airflow")
    ok, t0 = True, time.perf_counter()
    for _ in range(n // (engine.config.max_groups // 2) + 1):  # the first polls push every DAG
        recorder.update(reader._read_now())
        ok = engine.flush(600) and ok
    setup_s = time.perf_counter() - t0
    ratios, plain, polled = [], [], []
    for i in range(rounds):
        res = {}
        for variant in (("plain", "polled") if i % 2 == 0 else ("polled", "plain")):
            poller = None
            if variant == "polled":
                poller = Poller(recorder, reader._read_now, 0.5, "bench")
                poller.start()
            res[variant] = loop(2.0)
            if poller is not None:
                poller.stop()
        plain.append(res["plain"]); polled.append(res["polled"])
        ratios.append(res["polled"] / res["plain"])
    ok = engine.flush(120) and ok
    print("RESULT " + json.dumps({"reads": reads, "woken": woken, "ratios": ratios, "plain": plain,
                                  "polled": polled, "ok": ok, "setup_s": setup_s}))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dags", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=11)
    a = ap.parse_args()
    home = tempfile.mkdtemp(prefix="bench-airflow-schedules-")
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_PUSH_")}
    env.update({"AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(home, "dags"),
                "PATH": bindir + os.pathsep + env.get("PATH", "")})
    subprocess.run([os.path.join(bindir, "airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=600)
    for gw in gateway.running():
        q = subprocess.run([sys.executable, "-c", CHILD, str(a.dags), str(a.rounds)],
                           env={**env, "ORCHESTRATOR_PUSH_URL": gw.url,
                                "ORCHESTRATOR_PUSH_SPOOL_DIR": "off"},
                           capture_output=True, text=True, timeout=3600)
        res = next((x for x in q.stdout.splitlines() if x.startswith("RESULT ")), None)
        if q.returncode != 0 or res is None:
            print(q.stdout[-2000:], q.stderr[-4000:])
            return 1
        r = json.loads(res.split(" ", 1)[1])
        groups = [g for g in gw.groups() if g.labels.get("job") == "airflow"]
        due = sum("orchestrator_flow_next_run_timestamp_seconds" in g.metrics
                  and bool(g.metrics["orchestrator_flow_next_run_timestamp_seconds"])
                  for g in groups)
        paused = a.dags // 10 + (1 if a.dags % 10 else 0)
        correct = due == a.dags - paused and len(groups) == a.dags
        import airflow

        reads = sorted(r["reads"])
        slow = 1 - statistics.median(r["ratios"])
        print(f"# Airflow {airflow.__version__}: reading {a.dags} DAGs' schedules. "
              f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d')}; {a.rounds} interleaved rounds")
        print("| measure | value | correct |")
        print("|---|---|---|")
        print(f"| one read of the dag table, p50 | {statistics.median(reads):.1f} ms | "
              f"{correct} ({due} next runs, {len(groups)} groups) |")
        print(f"| one read, p99 | {reads[min(len(reads) - 1, int(0.99 * len(reads)))]:.1f} ms | |")
        print(f"| reader's share of one core at its real rate (every 10 s) | "
              f"{statistics.median(reads) / 100:.2f} % | |")
        woken = sorted(r["woken"])
        print(f"| one woken read (a DAG run started: that DAG's row alone), p50 | "
              f"{statistics.median(woken):.2f} ms | |")
        print(f"| its share of one core at most (one woken read a second, while runs start) | "
              f"{statistics.median(woken) / 10:.3f} % | |")
        print(f"| scheduler-like loop, iterations per 2 s without / with a read every 0.5 s "
              f"(median) | {statistics.median(r['plain']):.0f} / "
              f"{statistics.median(r['polled']):.0f} | |")
        print(f"| its slowdown with a read every 0.5 s (median of per-round ratios) | "
              f"{slow * 100:.1f} % | |")
        print(f"| the same at the real rate (every 10 s: a 20th) | {slow * 5:.2f} % | |")
        print(f"| first polls: every DAG pushed, to a gateway of {a.dags} groups | "
              f"{r['setup_s']:.0f} s | delivered within the flushes: {r['ok']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
