"""A task worker (`prefect.task_worker.serve`) with `instrument()` under `__main__`."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deployed_flows import tw_fail, tw_ok
from prefect.task_worker import serve

if __name__ == "__main__":
    from orchestrator_push.prefect import instrument

    instrument()
    serve(tw_ok, tw_fail)
