"""`flow.serve()` as its docs show it: `instrument()` only under `__main__`,
which the served runs' own processes never execute."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deployed_flows import served_kill, served_ok
from prefect import serve

if __name__ == "__main__":
    from orchestrator_push.prefect import instrument

    instrument()
    serve(served_ok.to_deployment(name="s"), served_kill.to_deployment(name="s"),
          print_starting_message=False)
