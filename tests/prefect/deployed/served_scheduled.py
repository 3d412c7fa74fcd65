"""`flow.serve()` of one flow with a yearly schedule, as Prefect's docs show
it: `instrument()` under `__main__`. A SIGTERM stops it cleanly, and Prefect
pauses its schedule then (`pause_on_shutdown`)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deployed_flows import served_scheduled

if __name__ == "__main__":
    from orchestrator_push.prefect import instrument

    instrument()
    served_scheduled.serve(name="s", cron="0 0 1 1 *", print_starting_message=False)
