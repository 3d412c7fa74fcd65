"""The ``orchestrator-push`` console script: :func:`orchestrator_push.cli.main`
in a process that ends with it.

``exec`` starts with every run of a cron job or CI step, and the collector
costs it more than its work does: about 4 ms of collections while the imports
build their objects, about 12 ms of a last collection over all of them at
exit (of about 95 ms; docs/performance.md). Frozen objects are never
collected, which only a process about to end can afford for all of them.
"""

from __future__ import annotations

import gc
import sys


def run() -> None:
    gc.disable()
    from .cli import main  # the imports: nothing they build is garbage

    # Collections go on while the command runs (it may run for hours), over
    # what it makes, not over what the imports made.
    gc.freeze()
    gc.enable()
    code = main()
    gc.freeze()  # main() has closed what it opened: the exit frees the rest
    sys.exit(code)
