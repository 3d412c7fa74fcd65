"""`flow.serve()` as its docs show it: `instrument()` only under `__main__`,
which the served runs' own processes never execute."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deployed_flows import served_cancel, served_exit, served_kill, served_ok
from prefect import serve

if __name__ == "__main__":
    from orchestrator_push.prefect import instrument

    instrument()
    serve(*(f.to_deployment(name="s") for f in (served_ok, served_exit, served_kill,
                                                 served_cancel)),
          print_starting_message=False)
