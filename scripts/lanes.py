"""Runs every nox session in N lanes at once, one `nox` process per lane.

Most of the suite waits on real processes (a scheduler's next loop, a 60 s
schedule, a worker declared gone after 2 minutes): one lane keeps a 2-CPU
machine 20-40 % busy. Lanes share nothing but the uv cache: every session has
its own virtualenv, every test its own ports, temporary and spool directories.

    python3 scripts/lanes.py 2

Sessions go to lanes longest first (the minutes below, from a serial CI run),
each to the lane with the least work so far. A lane's output goes to
.nox/lanes/lane-N.log; a line is printed as each session ends, then every
lane's log in full and those lines again, lane by lane. The exit code is 1 if any
session failed, as nox's own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

#: Minutes each session took in a serial CI run on the 2-CPU machine (2026-12);
#: only the lanes' balance depends on them. A session not listed counts DEFAULT.
MINUTES = {
    "prefect(python='3.11', prefect='3.9')": 12,
    "airflow(python='3.11', airflow='3.3')": 9,
    "prefect(python='3.11', prefect='3.8')": 7,
    "airflow(python='3.11', airflow='2.10')": 6,
    "e2e": 6,
    "celery(python='3.11', celery='5.7')": 3,
    "celery(python='3.12', celery='5.7')": 3,
    "prefect(python='3.12', prefect='3.9')": 2.5,
    "celery(python='3.11', celery='5.4')": 2,
    "core-3.10": 2,
    "core-3.11": 2,
    "core-3.12": 2,
    "core-3.13": 2,
    "airflow(python='3.12', airflow='3.3')": 1.5,
    "counts": 1,
    "celery_green(pool='gevent')": 0.5,
    "celery_green(pool='eventlet')": 0.5,
    "lint": 0.1,
}
DEFAULT = 3.0
ENDED = re.compile(r"^nox > Session (.+) (was successful|failed|was skipped)(.*)$")


def sessions() -> list[str]:
    out = subprocess.run(
        ["nox", "--list", "--json"], check=True, capture_output=True, text=True
    ).stdout
    return [s["session"] for s in json.loads(out)]


def assign(names: list[str], n: int) -> list[list[str]]:
    """Longest first, each to the least loaded lane."""
    lanes: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for name in sorted(names, key=lambda s: -MINUTES.get(s, DEFAULT)):
        i = load.index(min(load))
        lanes[i].append(name)
        load[i] += MINUTES.get(name, DEFAULT)
    return [lane for lane in lanes if lane]


def main(argv: list[str]) -> int:
    (n,) = map(int, argv)
    lanes = assign(sessions(), n)
    os.makedirs(os.path.join(".nox", "lanes"), exist_ok=True)
    started = time.monotonic()
    procs, logs = [], []
    for i, lane in enumerate(lanes, 1):
        path = os.path.join(".nox", "lanes", f"lane-{i}.log")
        print(f"lanes: lane {i} ({path}): {', '.join(lane)}", flush=True)
        logs.append(path)
        with open(path, "w") as log:  # the lane's nox writes to its own copy
            # a session of its own, so that stopping the lanes stops everything they started
            procs.append(
                subprocess.Popen(
                    ["nox", "-s", *lane],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def stop(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    seen = [0] * len(procs)
    ended: list[tuple[int, str]] = []  # for the summary: nox prints none for a one-session lane
    while True:
        running = [p.poll() is None for p in procs]
        for i, path in enumerate(logs):  # a line as each session ends
            with open(path, errors="replace") as f:
                lines = f.read().split("\n")[:-1]  # whole lines only
            for line in lines[seen[i] :]:
                m = ENDED.match(line)
                if m:
                    minutes = (time.monotonic() - started) / 60
                    ended.append((i, f"lane {i + 1}: {m.group(1)} {m.group(2)}{m.group(3)}"))
                    print(f"lanes: [{minutes:5.1f} min] {ended[-1][1]}", flush=True)
            seen[i] = len(lines)
        if not any(running):
            break
        time.sleep(2)
    for i, path in enumerate(logs, 1):
        print(f"\n===== lane {i}: {path} =====", flush=True)
        with open(path, errors="replace") as f:
            sys.stdout.write(f.read())
    print(f"\nlanes: {len(lanes)} lanes in {(time.monotonic() - started) / 60:.1f} min")
    print("\n".join(text for _, text in sorted(ended, key=lambda e: e[0])))
    return 0 if all(p.returncode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
