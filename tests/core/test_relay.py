"""The pool-child relay: what a child gives up on reaches the parent's loss ledger."""

from __future__ import annotations

import os
import threading
from collections import Counter

from gateway import wait_until

from orchestrator_push.ledger import Loss
from orchestrator_push.relay import Relay


def test_a_childs_losses_are_told_to_the_parent() -> None:
    got: list[object] = []
    lost: Counter[str] = Counter()
    reading = threading.Event()

    def handler(item: object) -> None:
        reading.wait(30)  # the parent does not read: the pipe fills, the backlog too
        got.append(item)

    relay = Relay(handler, backlog=5, on_lost=lambda r, n: lost.update({r.value: n}))
    sent = 2_000
    sent_all_r, sent_all_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            relay.send("x" * 10_000)  # larger than one atomic pipe write
            for i in range(sent):  # far more than the pipe and the backlog hold
                relay.send(("record", i, "y" * 100))
            os.write(sent_all_w, b"1")
            reading_ok = relay.drain(30)  # the parent reads again meanwhile
            os._exit(0 if not reading_ok else 1)  # something was dropped: drain says so
        except BaseException:
            os._exit(2)
    try:
        assert os.read(sent_all_r, 1) == b"1"  # the child has sent (or given up on) all
        reading.set()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_until(lambda: len(got) + lost[Loss.RELAY_BACKLOG_FULL.value] == sent, 30,
                   what="every record delivered or counted")
        assert lost[Loss.RELAY_TOO_LARGE.value] == 1
        assert lost[Loss.RELAY_BACKLOG_FULL.value] > 0
    finally:
        reading.set()
