"""One ledger of what this process did with its records, every loss included.

Every way a record can be lost goes through :meth:`Ledger.lose` (the group cap,
a refused push, a full or broken spool, an unreadable spool file, a record
that a Celery pool child could not hand to its parent). The ledger feeds
:class:`Stats` (``Engine.stats()``), the self-metrics pushed with every group,
and ``flush()``'s answer (it is False when something was lost since the
previous flush). One lock; every method is a few dictionary operations.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class Loss(str, Enum):
    """Why records were given up on: the ``reason`` label of
    ``orchestrator_push_records_dropped_total``."""

    TOO_MANY_GROUPS = "too_many_groups"  # the group cap, with no settled group to evict
    REJECTED = "rejected"  # the gateway refused the push (4xx other than 401/403)
    SPOOL_FULL = "spool_full"  # undeliverable, and the spool was at its size bound
    SPOOL_ERROR = "spool_error"  # undeliverable, and the spool could not be written
    SPOOL_UNREADABLE = "spool_unreadable"  # a spool file that could not be parsed (per file)
    INVALID = "invalid"  # a record with a non-finite end time
    RELAY_BACKLOG_FULL = "relay_backlog_full"  # a Celery pool child's pipe stayed full
    RELAY_TOO_LARGE = "relay_too_large"  # a record too large for one atomic pipe write
    RELAY_BROKEN = "relay_broken"  # the pool child's parent was gone
    HOST_COUNTS_ERROR = "host_counts_error"  # the host's count store could not be written

    def __str__(self) -> str:
        return self.value


@dataclass
class Stats:
    """What the engine did; read with :meth:`Engine.stats`. ``lost`` holds every
    loss by reason; the other fields count what was not lost."""

    recorded: int = 0
    pushes: int = 0
    push_failures: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    spooled: int = 0  # records written to the spool
    replayed: int = 0  # spooled records (of any process) this one delivered
    cleaned: int = 0  # records whose negative or non-finite duration was sent as 0
    lost: Counter[str] = field(default_factory=Counter)

    @property
    def rejected(self) -> int:
        return self.lost[Loss.REJECTED.value]

    @property
    def dropped_too_many_groups(self) -> int:
        return self.lost[Loss.TOO_MANY_GROUPS.value]

    @property
    def dropped_spool_full(self) -> int:
        return self.lost[Loss.SPOOL_FULL.value] + self.lost[Loss.SPOOL_ERROR.value]


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = Stats()
        self._lost_total = 0
        self._lost_seen = 0  # the total the last call of lost_since_last_look() saw

    def lose(self, reason: Loss, n: int = 1, *, own: bool = True) -> None:
        """Count ``n`` records given up on. ``own=False``: records of other
        processes (a spool file being replayed), which do not make this
        process's ``flush()`` false."""
        if n <= 0:
            return
        with self._lock:
            self._stats.lost[reason.value] += n
            if own:
                self._lost_total += n

    def recorded(self, n: int = 1) -> None:
        # Called under the engine's lock on every record: no lock of its own.
        self._stats.recorded += n

    def cleaned(self) -> None:
        with self._lock:
            self._stats.cleaned += 1

    def pushed(self) -> None:
        with self._lock:
            self._stats.pushes += 1

    def push_failed(self, label: str, retried: bool) -> None:
        with self._lock:
            self._stats.push_failures[label] += 1
            if retried:
                self._stats.retries += 1

    def spooled(self, n: int) -> None:
        with self._lock:
            self._stats.spooled += n

    def replayed(self, n: int) -> None:
        with self._lock:
            self._stats.replayed += n

    def lost_since_last_look(self) -> int:
        """Records lost since the previous call (``flush()`` reports them once)."""
        with self._lock:
            n, self._lost_seen = self._lost_total - self._lost_seen, self._lost_total
        return n

    def snapshot(self) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(
                s.recorded,
                s.pushes,
                Counter(s.push_failures),
                s.retries,
                s.spooled,
                s.replayed,
                s.cleaned,
                Counter(s.lost),
            )
