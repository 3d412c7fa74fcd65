"""Eight `exec` processes at once on one host, fifty runs each: the host's
count group at a real gateway adds up to exactly 400, by status, and never goes
down between reads taken while they run (host_counts.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

from gateway import Pushgateway

from orchestrator_push import host_counts

PROCESSES, RUNS = 8, 50
NS = "orchestrator"


def cli() -> list[str]:
    found = shutil.which("orchestrator-push", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "orchestrator_push"]


def code_of(run: int) -> int:
    return 0 if run % 5 else 3  # one run in five fails


def test_concurrent_short_lived_processes_count_exactly(pushgateway: Pushgateway,
                                                       tmp_path: object) -> None:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "ORCHESTRATOR_PUSH_SPOOL_DIR": os.path.join(str(tmp_path), "spool")}
    errors: list[str] = []

    def runner() -> None:
        for run in range(RUNS):
            p = subprocess.run([*cli(), "exec", "--job", "cron", "--", "sh", "-c",
                                f"exit {code_of(run)}"], env=env, capture_output=True,
                               text=True, timeout=120)
            if p.returncode != code_of(run) or p.stderr:
                errors.append(f"run {run}: {p.returncode} {p.stderr}")

    threads = [threading.Thread(target=runner) for _ in range(PROCESSES)]
    for t in threads:
        t.start()
    reads: list[dict[str, float]] = []
    while any(t.is_alive() for t in threads):
        reads.append(pushgateway.runs_by_status())
        threads[0].join(0.05)
    for t in threads:
        t.join()
    assert errors == []
    final = pushgateway.runs_by_status()
    failed = PROCESSES * sum(1 for run in range(RUNS) if code_of(run))
    assert final == {"success": PROCESSES * RUNS - failed, "failed": failed}
    # read while they ran: never down, per status
    assert len(reads) > 10
    for earlier, later in zip([*reads], [*reads[1:], final], strict=True):
        for status, n in earlier.items():
            assert later.get(status, 0) >= n, (earlier, later)
    # one cumulative group for the host, whatever the number of processes
    counted = [g for g in pushgateway.groups() if f"{NS}_task_runs_total" in g.metrics]
    assert [g.labels for g in counted] == [{"job": "cron", "instance": host_counts.instance()}]
    g = counted[0]
    assert g.value(f"{NS}_task_duration_seconds", __count__="1", status="failed",
                   framework="exec", flow="cron", task="main") == failed
