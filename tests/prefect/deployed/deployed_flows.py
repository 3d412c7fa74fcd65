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
