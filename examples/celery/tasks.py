"""A Celery app reporting every task to the Pushgateway: the one added line is instrument(app).

See README.md beside this file for the commands.
"""

from __future__ import annotations

import os
import random
import time

from celery import Celery

from orchestrator_push.celery import instrument

app = Celery("shop", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.task_ignore_result = True
instrument(app)  # ORCHESTRATOR_PUSH_URL etc. from the environment


@app.task(name="shop.charge")
def charge(order_id: int) -> str:
    time.sleep(random.uniform(0.01, 0.2))
    return f"charged {order_id}"


@app.task(name="shop.ship", bind=True, max_retries=2, default_retry_delay=0)
def ship(self, order_id: int) -> str:  # type: ignore[no-untyped-def]
    if self.request.retries == 0 and order_id % 3 == 0:
        raise self.retry()  # reported as status="retry", then success with attempt=2
    return f"shipped {order_id}"


@app.task(name="shop.refund")
def refund(order_id: int) -> None:
    raise ValueError(f"order {order_id} cannot be refunded")  # status="failed"
