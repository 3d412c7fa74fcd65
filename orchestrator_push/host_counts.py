"""Run counts of a host's short-lived processes, added up in a file beside the spool.

The Pushgateway cannot add up counters pushed by many processes: each push of a
group replaces it. A cron job's or CI step's process lives for one run, so it
cannot hold a counter either. Instead the processes of one host and user share
a small store, ``<spool dir>/counts/<group>.json``: at exit a process takes the
store's lock (``flock``), adds its own counts, writes the store back atomically
(temporary file, fsync, rename) and, still holding the lock, PUTs the totals as
the host's group (``instance="user@host"``). Pushes are thus made one at a time
in the order of the totals they carry, so the gateway never sees a count go
down, and there is one group per host and user however many processes ran.

When the lock cannot be had in time (a holder stuck on a slow gateway), the
process leaves its counts in a ``pending-*`` file that the next holder adds in;
when the push fails, the totals stay in the store and the next process on the
host pushes them with its own. Counts are lost only when the store cannot be
written at all (counted as ``host_counts_error``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from . import schema
from .config import DEFAULT_BUCKETS
from .ledger import Ledger, Loss
from .logs import warn_limited
from .records import FlowRecord, TaskRecord
from .transport import Transport

VERSION = 1
_PENDING = "pending-"
_POLL = 0.01  # seconds between two tries of a lock another process holds

# A flock belongs to the open file, which a fork shares: a child forked while
# our thread holds the store's lock (an Airflow executor forking a task runner)
# would hold it for as long as it lives. The child closes its copies.
_open_locks: set[int] = set()


def _close_locks_after_fork() -> None:
    for fd in list(_open_locks):
        with contextlib.suppress(OSError):
            os.close(fd)
    _open_locks.clear()


os.register_at_fork(after_in_child=_close_locks_after_fork)


def instance() -> str:
    """The host group's ``instance``: one store per user and host."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name (a container with an unnamed uid)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def group_key(job: str, static: Mapping[str, str]) -> schema.GroupKey:
    return (("job", job), ("instance", instance()), *sorted(static.items()))


class HostCounts:
    """This process's counts for one host group, until :meth:`deliver` hands
    them to the host's store."""

    def __init__(
        self,
        directory: str,
        key: schema.GroupKey,
        framework: str = "",
        ttl: float = 0.0,
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        """``framework`` and ``ttl`` (when above 0): the group's declared expiry.
        ``buckets``: the duration histograms' bounds; counts the store kept with
        other bounds are moved to these (:func:`schema.rebucket`)."""
        self.key = key
        self._framework = framework
        self._ttl = ttl
        self.path = schema.group_path(key)
        self._dir = os.path.join(directory, "counts")
        self._name = hashlib.sha256(self.path.encode()).hexdigest()[:24]
        self._lock = threading.Lock()  # the counts
        self._delivering = threading.Lock()
        self._buckets = buckets
        self._counts = schema.Cumulative(buckets)

    def __repr__(self) -> str:
        return f"<HostCounts {self.path} pending={self.pending()}>"

    @property
    def store(self) -> str:
        return os.path.join(self._dir, self._name + ".json")

    def add(self, rec: TaskRecord | FlowRecord) -> None:
        with self._lock:
            if isinstance(rec, TaskRecord):
                self._counts.add(rec)
            else:
                self._counts.add_flow(rec)

    def pending(self) -> int:
        with self._lock:
            return len(self._counts)

    def deliver(
        self,
        connect: Callable[[], Transport],
        ns: str,
        deadline: float,
        ledger: Ledger,
        *,
        exiting: bool,
        wait: bool = True,
    ) -> bool:
        """Hand this process's counts to the store and push the host's totals
        (on ``connect()``'s transport, asked for only then).
        True when they reached the gateway; False when they wait in the store
        for the next push, or were lost (ledger). The store locked past the
        deadline: a process that goes on keeps its counts for its next try; one
        that is ``exiting`` leaves them in a pending file. Another delivery of
        this process in progress is waited for (``wait``, until the deadline),
        or left to take the counts (False returned, the next try sends what
        comes after)."""
        # One delivery at a time in this process: an exit flush waits for the
        # sender's, then sees what that one had to keep.
        timeout = max(deadline - time.monotonic(), 0.0) if wait else 0.0
        if not self._delivering.acquire(timeout=timeout):
            return False
        try:
            return self._deliver(connect, ns, deadline, ledger, exiting)
        finally:
            self._delivering.release()

    def _deliver(
        self,
        connect: Callable[[], Transport],
        ns: str,
        deadline: float,
        ledger: Ledger,
        exiting: bool,
    ) -> bool:
        with self._lock:
            n = len(self._counts)
            if n == 0:  # the usual case after a sender cycle: nothing new
                return True
            mine, self._counts = self._counts, schema.Cumulative(self._buckets)
        try:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            fd = os.open(
                os.path.join(self._dir, self._name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
            _open_locks.add(fd)
        except OSError as exc:
            return self._lost(ledger, n, exc)
        try:
            try:
                if not _lock(fd, deadline):
                    if exiting:
                        return self._leave_pending(mine, ledger, n)
                    with self._lock:
                        self._counts.absorb(mine.dump())
                    return False
                totals, absorbed = self._load()
                merged = self._merge_pending(totals, absorbed)
                totals.absorb(mine.dump())
                # The store names the pending files it took in, so one whose
                # removal did not happen (a crash just after) is not added twice.
                kept = [p for p in absorbed if os.path.exists(os.path.join(self._dir, p))]
                _write(
                    self.store,
                    {
                        "version": VERSION,
                        "group": self.path,
                        "absorbed": kept + merged,
                        "bounds": list(self._buckets),
                        "series": totals.dump(),
                    },
                )
            except OSError as exc:
                return self._lost(ledger, n, exc)
            for name in merged:  # in the store now
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self._dir, name))
            families = totals.families(ns)
            if self._ttl > 0:
                families.append(schema.ttl_family(ns, self._framework, self._ttl))
            outcome = connect().request("PUT", self.path, schema.encode(families))
            if outcome.ok:
                ledger.pushed()
                return True
            ledger.push_failed(outcome.label, retried=True)
            warn_limited(
                "host-counts-push",
                "orchestrator_push: counts of this host not pushed (%s); they are kept in "
                "%s and pushed by the next run on this host",
                outcome.error or outcome.label,
                self.store,
            )
            return False
        finally:
            # Unlocked explicitly: a child forked meanwhile shares the open file,
            # and a close here would leave the lock to its copy.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            _open_locks.discard(fd)
            os.close(fd)

    def _load(self) -> tuple[schema.Cumulative, list[str]]:
        totals = schema.Cumulative(self._buckets)
        try:
            with open(self.store, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("version") != VERSION:
                raise ValueError("version")
            self._absorb(totals, data, self.store)
            return totals, [str(p) for p in data.get("absorbed", [])]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError):
            # Another layout (a newer or older version, a damaged file): start
            # afresh and keep the old one to look at. Prometheus reads a reset.
            bad = f"{self.store}.bad-{time.time_ns()}"
            with contextlib.suppress(OSError):
                os.replace(self.store, bad)
            warn_limited(
                "host-counts-bad",
                "orchestrator_push: could not read the host's counts %s; moved to %s, "
                "counting starts again",
                self.store,
                bad,
            )
            totals = schema.Cumulative(self._buckets)
        return totals, []

    def _absorb(self, totals: schema.Cumulative, data: object, path: str) -> None:
        """Add a store's or pending file's counts (ValueError: another layout,
        nothing added); a file without bounds was written before they could be
        chosen, with the default ones."""
        if not isinstance(data, dict) or not isinstance(data.get("series"), list):
            raise ValueError("layout")
        bounds = data.get("bounds", DEFAULT_BUCKETS)
        totals.absorb(data["series"], bounds)  # checks the bounds
        if tuple(bounds) != self._buckets:
            warn_limited(
                "host-counts-buckets",
                "orchestrator_push: the host's counts in %s were kept with other bucket "
                "bounds (ORCHESTRATOR_PUSH_BUCKETS changed, or differs between this host's "
                "processes); moved to this process's bounds",
                path,
            )

    def _merge_pending(self, totals: schema.Cumulative, absorbed: list[str]) -> list[str]:
        """Add in the pending files of this group; their names."""
        merged = []
        prefix = f"{_PENDING}{self._name}-"
        for entry in os.scandir(self._dir):
            if not entry.name.startswith(prefix) or not entry.name.endswith(".json"):
                continue
            if entry.name in absorbed:  # added before; its removal did not happen
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            try:
                with open(entry.path, encoding="utf-8") as f:
                    self._absorb(totals, json.load(f), entry.path)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a file being written (not renamed yet cannot match) or damaged
            merged.append(entry.name)
        return merged

    def _leave_pending(self, mine: schema.Cumulative, ledger: Ledger, n: int) -> bool:
        name = f"{_PENDING}{self._name}-{os.getpid()}-{time.time_ns()}.json"
        try:
            _write(
                os.path.join(self._dir, name),
                {"version": VERSION, "bounds": list(self._buckets), "series": mine.dump()},
            )
        except OSError as exc:
            return self._lost(ledger, n, exc)
        warn_limited(
            "host-counts-busy",
            "orchestrator_push: the host's counts %s stayed locked; this run's counts wait "
            "in %s for the next run",
            self.store,
            name,
        )
        return False

    def _lost(self, ledger: Ledger, n: int, exc: OSError) -> bool:
        ledger.lose(Loss.HOST_COUNTS_ERROR, n)
        warn_limited(
            "host-counts-error",
            "orchestrator_push: could not write the host's counts in %s (%s); %d runs not counted",
            self._dir,
            exc.strerror or exc,
            n,
        )
        return False


def _lock(fd: int, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


def _write(path: str, data: object) -> None:
    """Atomically: a reader sees the old file or the new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
