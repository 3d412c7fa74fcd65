"""What our threads would import at first use, imported before the first of them starts.

A fork during an import on a thread leaves the child that module's import
lock, held by a thread it does not have: the child hangs at its own next
import of that module. Celery's prefork pool forks while our sender makes its
first push. So the caller's thread imports, before a thread of ours starts:

- :mod:`encodings.idna`: the first connection to a host name given as text
  encodes it with the idna codec, which Python imports on first use (a Celery
  pool child hung at its first result stored);
- :mod:`logging`, for the threads' first warning (logs.py imports it at the
  first line).

``orchestrator-push exec`` starts no thread (its engine is driven by the
thread that waits for the command): its start-up is spared both.
"""

from __future__ import annotations

_done = False


def before_threads() -> None:
    """Called before a thread of ours starts."""
    global _done
    if not _done:
        import encodings.idna  # noqa: F401
        import logging  # noqa: F401

        _done = True
