"""An embedded worker node, as Celery's pytest fixtures start one
(`celery.contrib.testing.worker.start_worker`).

Usage: python embedded.py NODE N POOL. Starts node NODE, publishes N tasks,
waits for Celery's record of each (whichever node ran it), flushes, exits.
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
    node, n, pool = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    app = celeryapp.app
    client = redis.Redis.from_url(celeryapp.broker)
    kw: dict[str, str] = {}
    if 'kwargs.pop("hostname"' in inspect.getsource(testing._start_worker_thread):
        kw = {"hostname": node}
    else:  # Celery 5.4 names every embedded node gen<pid>@host: name it
        testing.anon_nodename = lambda *a, **k: node
    with start_worker(app, pool=pool, perform_ping_check=False, shutdown_timeout=90, **kw):
        results = [celeryapp.sleep.delay(0.05) for _ in range(n)]
        deadline = time.monotonic() + 90
        while not all(client.get(f"celery-task-meta-{r.id}") for r in results):
            if time.monotonic() > deadline:
                raise SystemExit("tasks did not finish")
            time.sleep(0.05)
    assert orchestrator_push.flush(10)


if __name__ == "__main__":
    main()
