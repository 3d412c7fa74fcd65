"""The Celery app the tests run in real worker processes (`celery -A celeryapp worker`)."""

from __future__ import annotations

import os
import time

from celery import Celery

from orchestrator_push.celery import instrument

broker = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("shop", broker=broker, backend=broker)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
    result_expires=600,
)

instrument(app)
instrument(app)  # idempotent: every test below would double-count otherwise


@app.task(name="shop.ok")
def ok(x: int = 0) -> int:
    return x


@app.task(name="shop.fail")
def fail() -> None:
    raise ValueError("boom")


@app.task(name="shop.flaky", bind=True, max_retries=3, default_retry_delay=0)
def flaky(self) -> str:  # type: ignore[no-untyped-def]
    if self.request.retries < 1:
        raise self.retry(countdown=0)
    return "ok"


@app.task(name="shop.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="shop.hard_limit", time_limit=1)
def hard_limit() -> None:
    time.sleep(30)


#: A name whose record cannot go through the pool's pipe in one atomic write.
TOO_LONG = "shop." + "x" * 5000


@app.task(name=TOO_LONG)
def too_long() -> None:
    return None
