"""Flows that the deployment tests deploy to a real process work pool."""

from __future__ import annotations

import os
import time

from prefect import flow, task


@task
def step(x: int) -> int:
    return x


@task(timeout_seconds=600)
def hold(path: str) -> None:
    """Says its process id in ``path.pid``, then waits for ``path`` to exist."""
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path + ".pid")
    while not os.path.exists(path):
        time.sleep(0.05)


@flow(name="deployed-ok")
def deployed_ok() -> None:
    step(1)


@flow(name="deployed-exit")
def deployed_exit() -> None:
    step(1)
    os._exit(3)


# One flow per test, so that no test sees another one's series. Top-level
# functions: a runner loads a crashed run's flow by its entrypoint.
@flow(name="deployed-kill", timeout_seconds=3600)
def deployed_kill(path: str) -> None:
    step(1)
    hold(path)


@flow(name="deployed-term", timeout_seconds=3600)
def deployed_term(path: str) -> None:
    step(1)
    hold(path)


@flow(name="deployed-cancel", timeout_seconds=3600)
def deployed_cancel(path: str) -> None:
    step(1)
    hold(path)


@flow(name="served-ok")
def served_ok() -> None:
    step(1)


@flow(name="served-kill", timeout_seconds=3600)
def served_kill(path: str) -> None:
    step(1)
    hold(path)


@flow(name="served-exit")
def served_exit() -> None:
    step(1)
    os._exit(3)


@flow(name="served-term", timeout_seconds=3600)
def served_term(path: str) -> None:
    step(1)
    hold(path)


@flow(name="served-cancel", timeout_seconds=3600)
def served_cancel(path: str) -> None:
    step(1)
    hold(path)


@task(name="tw_ok")
def tw_ok(x: int) -> int:
    return x


@task(name="tw_fail")
def tw_fail() -> None:
    raise ValueError("fails in a task worker")


@flow(name="deployed-unsubmittable")
def deployed_unsubmittable() -> None:
    """Deployed with a command that does not exist: the worker cannot start it."""


@task(name="counted_square")
def counted_square(i: int) -> int:
    if i % 25 == 0:
        raise ValueError(f"item {i} fails")
    return i * i


@task(name="counted_flaky", retries=1, retry_delay_seconds=0)
def counted_flaky(mark: str) -> None:
    if not os.path.exists(mark):  # the first attempt of each run fails
        open(mark, "w").close()
        raise RuntimeError("first attempt fails")


@flow(name="deployed-counted")
def deployed_counted(mark: str, path: str = "") -> None:
    """A .map() of 200 (8 fail) and a task retried once; with ``path``, then held
    in ``hold`` (for a test to kill it)."""
    from prefect.futures import wait

    futures = counted_square.map(range(200))
    counted_flaky(mark)
    wait(futures)
    if path:
        hold(path)


@flow(name="deployed-scheduled")
def deployed_scheduled() -> None:
    """Scheduled an hour ahead by the test: never run."""
    step(1)


# The detection matrix's flows (tests/prefect/test_prefect_matrix.py)
@flow(name="m-prefect-failed")
def m_prefect_failed() -> None:
    step(1)
    raise ValueError("m-prefect-failed fails, as planned")


@flow(name="m-prefect-hung", timeout_seconds=3)
def m_prefect_hung(path: str) -> None:
    hold(path)


@flow(name="m-prefect-vanish")
def m_prefect_vanish(path: str) -> None:
    hold(path)


@flow(name="m-prefect-cancel")
def m_prefect_cancel(path: str) -> None:
    hold(path)


@flow(name="m-prefect-every60")
def m_prefect_every60() -> None:
    step(1)


@flow(name="served-scheduled")
def served_scheduled() -> None:
    """Served with a yearly schedule by served_scheduled.py: never run."""
    step(1)
