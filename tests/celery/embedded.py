"""Two embedded worker nodes in one process, as Celery's pytest fixtures start them.

Usage: python embedded.py N POOL. Runs N tasks over both nodes, waits for
Celery's record of each, flushes and prints the task ids that finished.
"""

from __future__ import annotations

import inspect
import sys
import time

import celeryapp
import redis
from celery.contrib.testing import worker as testing
from celery.contrib.testing.worker import start_worker

import orchestrator_push


def main() -> None:
    n, pool = int(sys.argv[1]), sys.argv[2]
    app = celeryapp.app
    client = redis.Redis.from_url(celeryapp.broker)
    names = iter(["e1@box", "e2@box"])
    kw: dict[str, str] = {}
    if 'kwargs.pop("hostname"' in inspect.getsource(testing._start_worker_thread):
        kw = {"hostname": "e1@box"}
    else:  # Celery 5.4 names every embedded node gen<pid>@host: give them names
        testing.anon_nodename = lambda *a, **k: next(names)
    with start_worker(app, pool=pool, perform_ping_check=False, **kw), \
            start_worker(app, pool=pool, perform_ping_check=False,
                         **({"hostname": "e2@box"} if kw else {})):
        results = [celeryapp.sleep.delay(0.1) for _ in range(n)]
        deadline = time.monotonic() + 60
        while not all(client.get(f"celery-task-meta-{r.id}") for r in results):
            if time.monotonic() > deadline:
                raise SystemExit("tasks did not finish")
            time.sleep(0.05)
    assert orchestrator_push.flush(10)


if __name__ == "__main__":
    main()
