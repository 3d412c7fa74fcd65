"""The durable spool: what a process could not deliver, on local disk, for the next
process that reaches the gateway.

A spool is a directory of files, one per write, each a JSON list of group
states (grouping key, namespace, the newest record, newest success and failure
times). Writes are atomic: a temporary file, fsync, then rename into place, so
a crash mid-write leaves only a ``.tmp`` file that readers ignore (and remove
once it is an hour old). A reader claims a file by renaming it to
``<name>.claimed-<pid>``: rename is atomic, so of several processes on one
machine exactly one gets each file. The claimant deletes the file once it is
delivered, or renames it back for later. A claim whose process is gone is taken
over, as is one held for more than ten minutes. Oldest files are replayed first
(names start with the write time). A file that cannot be parsed is set aside
as ``<name>.bad`` (counted as lost, shown by ``doctor`` and ``status``) and
removed once it is ``BAD_MAX_AGE`` old, so it cannot keep the spool full.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .records import FlowRecord, TaskRecord

SUFFIX = ".spool"
_STALE_TMP = 3600.0
_STALE_CLAIM = 600.0
_RESCAN = 5.0  # seconds between two scans of the directory's size
BAD = ".bad"
#: Unreadable files are kept this long for a look, then removed.
BAD_MAX_AGE = 7 * 86400.0


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "orchestrator-push", "spool")


class Entry(NamedTuple):
    """One group's undelivered state."""

    kind: str  # "task" or "flow"
    key: tuple[tuple[str, str], ...]
    namespace: str
    last: TaskRecord | FlowRecord | None
    success_at: float | None
    failure_at: float | None
    records: int  # how many records this entry stands for (for the counts)


def _record_to_json(rec: TaskRecord | FlowRecord | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    out: dict[str, Any] = {
        "framework": rec.framework,
        "flow": rec.flow,
        "status": rec.status,
        "end_time": rec.end_time,
        "duration": rec.duration,
    }
    if isinstance(rec, TaskRecord):
        out.update(task=rec.task, attempt=rec.attempt, exit_code=rec.exit_code, run_id=rec.run_id)
        if rec.queued is not None:
            out["queued"] = rec.queued
    return out


def _record_from_json(d: dict[str, Any] | None) -> TaskRecord | FlowRecord | None:
    if d is None:
        return None
    common = (str(d["framework"]), str(d["flow"]))
    if "task" in d:
        return TaskRecord(
            *common,
            str(d["task"]),
            str(d["status"]),
            float(d["end_time"]),
            float(d["duration"]),
            int(d.get("attempt", 1)),
            None if d.get("exit_code") is None else int(d["exit_code"]),
            None if d.get("run_id") is None else str(d["run_id"]),
            None if d.get("queued") is None else float(d["queued"]),
        )
    return FlowRecord(*common, str(d["status"]), float(d["end_time"]), float(d["duration"]))


def encode(entries: list[Entry]) -> bytes:
    return json.dumps(
        [
            {
                "kind": e.kind,
                "key": [list(kv) for kv in e.key],
                "namespace": e.namespace,
                "last": _record_to_json(e.last),
                "success_at": e.success_at,
                "failure_at": e.failure_at,
                "records": e.records,
            }
            for e in entries
        ],
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8", errors="surrogateescape")


def decode(data: bytes) -> list[Entry]:
    out = []
    for d in json.loads(data.decode("utf-8", errors="surrogateescape")):
        out.append(
            Entry(
                kind=str(d["kind"]),
                key=tuple((str(k), str(v)) for k, v in d["key"]),
                namespace=str(d["namespace"]),
                last=_record_from_json(d.get("last")),
                success_at=None if d.get("success_at") is None else float(d["success_at"]),
                failure_at=None if d.get("failure_at") is None else float(d["failure_at"]),
                records=int(d.get("records", 1)),
            )
        )
    return out


class SpoolFull(Exception):
    pass


class Spool:
    bad_max_age = BAD_MAX_AGE

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        # The directory's size as last scanned, and when, plus what this process
        # wrote since: a write does not rescan a directory of many files.
        self._scanned_at = float("-inf")
        self._known_size = 0

    def __repr__(self) -> str:
        return f"Spool({self.directory!r})"

    def size(self) -> int:
        total = 0
        for entry in self._scan():
            with contextlib.suppress(OSError):
                total += entry.stat().st_size
        return total

    def write(self, entries: list[Entry], durable: bool = True) -> str:
        """Store ``entries``; the file's path. Raises SpoolFull or OSError.

        ``durable``: fsync before the rename, so the file survives a machine
        crash (a process crash never loses a renamed file either way)."""
        data = encode(entries)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        now = time.monotonic()
        if now - self._scanned_at > _RESCAN:
            self._known_size, self._scanned_at = self.size(), now
        if self._known_size + len(data) > self.max_bytes:
            raise SpoolFull(f"{self.directory} holds more than {self.max_bytes} bytes")
        name = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"
        tmp = os.path.join(self.directory, f".tmp-{name}")
        final = os.path.join(self.directory, name + SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        self._known_size += len(data)
        return final

    def pending(self) -> int:
        """Files waiting to be replayed (claimed ones included)."""
        return sum(
            1
            for e in self._scan()
            if not e.name.startswith(".") and (e.name.endswith(SUFFIX) or ".claimed-" in e.name)
        )

    def waiting(self) -> int:
        """Files no process has claimed."""
        return sum(1 for e in self._scan() if e.name.endswith(SUFFIX))

    def unreadable(self) -> list[str]:
        """Paths of the files set aside because they could not be parsed."""
        return sorted(e.path for e in self._scan() if e.name.endswith(SUFFIX + BAD))

    def claim(
        self, limit: int, on_unreadable: Callable[[str], None] = lambda path: None
    ) -> Iterator[tuple[str, list[Entry]]]:
        """Up to ``limit`` files, oldest first, each claimed by this process.

        Yields (claimed path, entries). The caller must :meth:`done` or
        :meth:`release` each. A file that cannot be parsed is moved aside
        (``.bad``) so it never blocks the spool, and ``on_unreadable`` is told.
        """
        self._tidy()
        names = sorted(e.name for e in self._scan() if e.name.endswith(SUFFIX))
        got = 0
        for name in names:
            if got >= limit:
                return
            src = os.path.join(self.directory, name)
            claimed = f"{src}.claimed-{os.getpid()}"
            try:
                os.rename(src, claimed)
            except OSError:
                continue  # another process took it
            try:
                with open(claimed, "rb") as f:
                    entries = decode(f.read())
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    os.replace(claimed, src + BAD)
                on_unreadable(src)
                continue
            got += 1
            yield claimed, entries

    def done(self, claimed: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claimed)

    def release(self, claimed: str) -> None:
        original = claimed.rsplit(".claimed-", 1)[0]
        with contextlib.suppress(FileNotFoundError):
            os.rename(claimed, original)

    def _scan(self) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(self.directory) as it:
                return list(it)
        except OSError:
            return []

    def _tidy(self) -> None:
        """Old temporary files (a crash mid-write) and old unreadable files go;
        claims of dead processes return."""
        now = time.time()
        for e in self._scan():
            try:
                if e.name.startswith(".tmp-"):
                    if now - e.stat().st_mtime > _STALE_TMP:
                        os.unlink(e.path)
                elif e.name.endswith(BAD):
                    if now - e.stat().st_mtime > self.bad_max_age:
                        os.unlink(e.path)
                elif ".claimed-" in e.name:
                    pid = int(e.name.rsplit(".claimed-", 1)[1])
                    # a claim's rename set its ctime: one this old is abandoned even if
                    # its pid is alive (reused, or a process stuck for good)
                    abandoned = now - e.stat().st_ctime > _STALE_CLAIM
                    if pid != os.getpid() and (abandoned or not _alive(pid)):
                        self.release(e.path)
            except (OSError, ValueError):
                continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
