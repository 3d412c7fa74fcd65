"""The beat test app, stopped by SIGTERM in the middle of a tick: as beat publishes
the second ping-every-3s, it writes the time and signals itself. Beat's own
SIGTERM handler saves its schedule file and raises SystemExit there, mid-tick."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from beatapp import app
from celery.signals import before_task_publish

__all__ = ["app"]
_sent: list[float] = []


@before_task_publish.connect
def _stop_on_second_send(headers: Any = None, **_: Any) -> None:
    if (headers or {}).get("task") != "shop.ok" or (headers or {}).get("argsrepr") != "()":
        return
    _sent.append(time.time())
    if len(_sent) == 2:
        with open(os.environ["TEST_SENT_FILE"], "w") as f:
            f.write(repr(_sent[1]))
        os.kill(os.getpid(), signal.SIGTERM)
