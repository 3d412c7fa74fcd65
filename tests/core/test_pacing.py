"""Self-pacing: a process whose pushes get slow or fail pushes less often, and
comes back to its configured interval once the gateway answers quickly again.
A real Pushgateway behind a proxy that delays its answers; the interval a
process pushes at is read back from the gateway (``push_interval_seconds``)."""

from __future__ import annotations

import threading
import time

from gateway import Pushgateway, wait_until
from proxy import Proxy

import orchestrator_push as op
from orchestrator_push.records import TaskRecord
from orchestrator_push.sender import MAX_PACED_INTERVAL, paced

NS = "orchestrator"


def test_a_slow_or_failing_cycle_doubles_the_interval_up_to_its_bound() -> None:
    assert paced(1.0, 1.0, spent=0.5, congested=False) == 2.0  # half the interval pushing
    assert paced(1.0, 1.0, spent=0.01, congested=True) == 2.0  # a timeout, a 5xx, a 429
    assert paced(16.0, 1.0, spent=8.0, congested=False) == MAX_PACED_INTERVAL == 30.0
    assert paced(60.0, 60.0, spent=40.0, congested=True) == 60.0  # never below the configured
    # a short interval is slow only past 0.1 s of pushing per cycle
    assert paced(0.05, 0.05, spent=0.09, congested=False) == 0.05
    assert paced(0.05, 0.05, spent=0.1, congested=False) == 0.1


def test_a_quick_cycle_halves_the_interval_back_and_a_steady_load_stays_put() -> None:
    assert paced(30.0, 1.0, spent=0.2, congested=False) == 15.0
    assert paced(1.5, 1.0, spent=0.2, congested=False) == 1.0
    # 20 groups over a 40 ms link take 0.8 s a cycle: 2 s is where that settles
    assert paced(1.0, 1.0, spent=0.8, congested=False) == 2.0
    assert paced(2.0, 1.0, spent=0.8, congested=False) == 2.0


def test_a_slow_gateway_gets_fewer_pushes_and_the_interval_comes_back(
    pushgateway: Pushgateway, proxy: Proxy
) -> None:
    e = op.Engine(op.load_config({}, url=proxy.url, interval=0.2, spool_dir=None, timeout=5.0))
    stop = threading.Event()

    def work() -> None:  # five tasks finishing all the time, for at most 60 s
        i = 0
        while not stop.wait(0.01) and i < 6000:
            e.record_task(TaskRecord("exec", "pace", f"t{i % 5}", "success", 1e9 + i, 0.1))
            i += 1

    def interval() -> float | None:
        try:
            g = pushgateway.group(job="exec", flow="pace", task="t0")
        except KeyError:
            return None
        return g.value(f"{NS}_push_interval_seconds", framework="exec")

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        wait_until(lambda: interval() == 0.2, 10, what="the configured interval at the gateway")
        proxy.delay = 0.05  # five pushes a cycle: 0.25 s of its 0.2 s interval
        # 0.25 s is less than half of 0.8 s: there it stays (more under a slow CI)
        wait_until(lambda: (interval() or 0) >= 0.8, 30, what="the interval stretched")
        assert interval() in (0.8, 1.6, 3.2)  # the configured one doubled, step by step
        pushes = pushgateway.push_count()
        time.sleep(2.0)  # an observation window, not a synchronisation
        # unpaced: 5 pushes every 0.45 s (0.25 s pushing, 0.2 s waiting), 22 in 2 s;
        # paced at 0.8 s or more: at most 5 every 1.05 s, 10 in 2 s (a cycle may straddle)
        assert pushgateway.push_count() - pushes <= 15
        proxy.delay = 0.0
        wait_until(lambda: interval() == 0.2, 60, what="the interval back to 0.2 s")
    finally:
        stop.set()
        t.join(10)
        e.close(5)
