"""`flow.serve()` as its docs show it: `instrument()` only under `__main__`,
which the served runs' own processes never execute."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deployed_flows import served_cancel, served_exit, served_kill, served_ok, served_term
from prefect import serve

if __name__ == "__main__":
    from orchestrator_push.prefect import instrument

    instrument()
    flows = (served_ok, served_exit, served_kill, served_term, served_cancel)
    serve(*(f.to_deployment(name="s") for f in flows),
          print_starting_message=False)
