"""The Celery app the tests run in real worker processes (`celery -A celeryapp worker`)."""

from __future__ import annotations

import os
import signal
import time

from celery import Celery
from celery.exceptions import Ignore, Reject

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

if os.environ.get("TEST_APP_CONF_BUCKETS"):  # as a user sets it: a list in app.conf
    app.conf.orchestrator_push_buckets = [float(b) for b in os.environ["TEST_APP_CONF_BUCKETS"].split(",")]

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


def _times(key: str) -> int:
    """How many times this key was seen, across processes and redeliveries (Redis)."""
    import redis

    return int(redis.Redis.from_url(broker).incr(f"test:times:{key}"))


@app.task(name="shop.killed_then_retried", bind=True, retry_on_worker_lost=True, max_retries=3,
          default_retry_delay=0)
def killed_then_retried(self) -> str:  # type: ignore[no-untyped-def]
    if self.request.retries < 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the pool process dies (an OOM kill, say)
    return "ok"


@app.task(name="shop.killed_then_requeued", bind=True, acks_late=True,
          reject_on_worker_lost=True)
def killed_then_requeued(self) -> str:  # type: ignore[no-untyped-def]
    if _times(self.request.id) <= 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ok"


@app.task(name="shop.rejected_then_ok", bind=True, acks_late=True)
def rejected_then_ok(self) -> str:  # type: ignore[no-untyped-def]
    if _times(self.request.id) <= 1:
        raise Reject("not now", requeue=True)
    return "ok"


@app.task(name="shop.timed_out_redelivered", bind=True, acks_late=True, acks_on_timeout=False,
          time_limit=1)
def timed_out_redelivered(self) -> str:  # type: ignore[no-untyped-def]
    if _times(self.request.id) <= 4:  # the first four deliveries hit the hard limit
        time.sleep(30)
    return "ok"


@app.task(name="shop.ignored")
def ignored() -> None:
    raise Ignore()


@app.task(name="shop.replaced", bind=True)
def replaced(self) -> None:  # type: ignore[no-untyped-def]
    raise self.replace(ok.s(5))
