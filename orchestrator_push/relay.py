"""Hand records from forked children to the process that pushes for them.

Pool children (Celery prefork) come and go; if each pushed its own cumulative
counts, a recycled child's replacement would overwrite them, or every child
ever forked would leave a group behind. Instead the long-lived parent creates a
pipe before it forks; children write each record to it and the parent's reader
thread hands it to the adapter, which records it into the parent's engine:
only the parent pushes.

A record is one length-prefixed pickle no larger than ``PIPE_BUF``, written
with a single non-blocking ``write``: POSIX makes it atomic, so children never
interleave, and a child never waits on the parent. If the pipe is full, the
child keeps the record in a bounded backlog and writes it later (at the latest
in :meth:`Relay.drain`, which the adapter calls before the child exits).
What a child has to give up (a record too large for one atomic write, a full
backlog) is counted and told to the parent in a small frame of its own at the
next write, so the parent's loss ledger has it; a broken pipe (the parent is
gone) is counted where it happens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import select
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from .ledger import Loss
from .logs import warn_limited
from .preimport import before_threads

_HEADER = struct.Struct("!I")
_MAX_FRAME = select.PIPE_BUF
_SYNC = "sync"
_ITEM = "item"
_LOST = "lost"

#: Called in the parent's reader thread with each item a child sent.
Handler = Callable[[object], None]
#: Told of every record given up on: (reason, how many).
OnLost = Callable[[Loss, int], None]


class Relay:
    """Create in the parent before forking; :meth:`send` from children."""

    def __init__(
        self, handler: Handler, *, backlog: int = 10_000, on_lost: OnLost | None = None
    ) -> None:
        self.owner = os.getpid()
        self._handler = handler
        self._on_lost = on_lost
        self._untold: Counter[Loss] = Counter()  # a child's losses the parent has not heard of
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        self._backlog: deque[bytes] = deque()
        self._backlog_max = backlog
        self.dropped = 0
        self._synced: dict[int, threading.Event] = {}
        self._sync_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._read, name="orchestrator-push-relay", daemon=True
        )
        before_threads()
        self._thread.start()
        os.register_at_fork(after_in_child=self._after_fork)

    def in_child(self) -> bool:
        return os.getpid() != self.owner

    def _after_fork(self) -> None:
        # The child only writes. Its copy of the read end would keep the pipe
        # open after the parent exits, hiding the parent's death: close it.
        if os.getpid() != self.owner:
            with contextlib.suppress(OSError):
                os.close(self._rfd)
            self._backlog.clear()
            self._untold.clear()
            self.dropped = 0

    # -- child side ---------------------------------------------------------------

    def send(self, item: object) -> None:
        """Hand one picklable item to the parent. Never blocks, never raises."""
        try:
            frame = _frame((_ITEM, item))
            if len(frame) > _MAX_FRAME:
                self._lose(Loss.RELAY_TOO_LARGE)
                warn_limited(
                    "relay-size",
                    "orchestrator_push: a record with names longer than %d bytes was dropped",
                    _MAX_FRAME,
                )
                return
            if self._backlog:
                self._write_backlog()
            if self._backlog or not self._write(frame):
                if len(self._backlog) >= self._backlog_max:
                    self._lose(Loss.RELAY_BACKLOG_FULL)
                    warn_limited(
                        "relay-backlog",
                        "orchestrator_push: the worker's main process is not reading; "
                        "records dropped (backlog of %d full)",
                        self._backlog_max,
                    )
                    return
                self._backlog.append(frame)
            self._tell()
        except Exception:
            warn_limited("relay-send", "orchestrator_push: could not hand a record to the parent")

    def _lose(self, reason: Loss, n: int = 1) -> None:
        self.dropped += n
        self._untold[reason] += n

    def _tell(self) -> None:
        """Tell the parent what this child gave up on, once the pipe has room."""
        if not self._untold or self._backlog:
            return
        frame = _frame((_LOST, {r.value: n for r, n in self._untold.items()}))
        if self._write(frame):
            self._untold.clear()

    def drain(self, timeout: float) -> bool:
        """Write the backlog, waiting up to ``timeout`` for room in the pipe.
        True when nothing is left behind."""
        deadline = time.monotonic() + timeout
        while self._backlog:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([], [self._wfd], [], remaining)
            self._write_backlog()
        with contextlib.suppress(OSError):
            self._tell()
        return self.dropped == 0

    def _write_backlog(self) -> None:
        while self._backlog and self._write(self._backlog[0]):
            self._backlog.popleft()

    def _write(self, frame: bytes) -> bool:
        try:
            os.write(self._wfd, frame)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:  # EPIPE: the parent is gone
            if exc.errno == errno.EPIPE:
                n = len(self._backlog) + 1
                self._backlog.clear()
                self.dropped += n
                if self._on_lost is not None:  # nobody will hear it: count it here
                    self._on_lost(Loss.RELAY_BROKEN, n)
                warn_limited(
                    "relay-broken",
                    "orchestrator_push: the worker's main process is gone; %d records dropped",
                    n,
                )
            raise

    # -- parent side --------------------------------------------------------------

    def sync(self, timeout: float) -> bool:
        """Parent: wait until every record written before this call was handled."""
        if os.getpid() != self.owner:
            return True
        event = threading.Event()
        with self._sync_lock:
            token = id(event)
            self._synced[token] = event
        frame = _frame((_SYNC, token))
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.write(self._wfd, frame)
                break
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                select.select([], [self._wfd], [], min(remaining, 0.05))
        return event.wait(max(deadline - time.monotonic(), 0.0))

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._rfd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buf)
                if len(buf) < _HEADER.size + size:
                    break
                body, buf = buf[_HEADER.size : _HEADER.size + size], buf[_HEADER.size + size :]
                self._dispatch(body)

    def _dispatch(self, body: bytes) -> None:
        try:
            first, second = pickle.loads(body)
            if first == _SYNC:
                with self._sync_lock:
                    event = self._synced.pop(second, None)
                if event is not None:
                    event.set()
                return
            if first == _LOST:
                if self._on_lost is not None:
                    for reason, n in second.items():
                        self._on_lost(Loss(reason), int(n))
                return
            self._handler(second)
        except Exception:
            warn_limited("relay-read", "orchestrator_push: could not read a relayed record")


def _frame(obj: object) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body
