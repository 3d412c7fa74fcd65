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


def _waiting(name: str):  # type: ignore[no-untyped-def]
    @flow(name=name, timeout_seconds=3600)
    def waiting(path: str) -> None:
        step(1)
        hold(path)

    return waiting


# One flow per test, so that no test sees another one's series.
deployed_kill = _waiting("deployed-kill")
deployed_term = _waiting("deployed-term")
deployed_cancel = _waiting("deployed-cancel")
