"""The detection matrix's Celery app (`celery -A matrix_celery worker|beat`): a task
that fails, one beat runs every 3 s, and one that hangs past its time limit on a
worker the test kills."""

from __future__ import annotations

import os
import time

from celery import Celery

from orchestrator_push.celery import instrument

app = Celery("matrix", broker=os.environ["MATRIX_REDIS_URL"], backend=os.environ["MATRIX_REDIS_URL"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
    timezone="UTC",
    beat_schedule={"tick-every-3s": {"task": "matrix.tick", "schedule": 3.0}},
)
instrument(app)


@app.task(name="matrix.fail")
def fail() -> None:
    raise ValueError("the matrix's failure")


@app.task(name="matrix.tick")
def tick() -> None:
    return None


@app.task(name="matrix.stuck", time_limit=3)
def stuck() -> None:
    """Started on the worker the test kills: it never finishes."""
    time.sleep(600)


@app.task(name="matrix.victim")
def victim(pid_file: str) -> None:
    """Says its pool process's pid, then waits to be killed there."""
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    time.sleep(600)
