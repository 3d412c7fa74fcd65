"""Flows and tasks the tests run. Defined at import, before instrument() is called."""

from __future__ import annotations

from prefect import flow, task

calls: list[str] = []


def user_hook(tsk, run, state) -> None:  # type: ignore[no-untyped-def]
    calls.append(f"user:{tsk.name}:{state.name}")


@task(on_completion=[user_hook])
def ok_task(x: int) -> int:
    return x


@task
def bad_task() -> None:
    raise ValueError("boom")


_flaky_runs: dict[str, int] = {}


@task(retries=1, retry_delay_seconds=0)
def flaky_task(key: str) -> str:
    _flaky_runs[key] = _flaky_runs.get(key, 0) + 1
    if _flaky_runs[key] == 1:
        raise RuntimeError("first try fails")
    return "ok"


@task(cache_key_fn=lambda ctx, params: "fixed-key", persist_result=True)
def cached_task() -> int:
    return 7


@flow(name="child-flow")
def child_flow() -> int:
    return ok_task(1)


@flow
def main_flow(key: str) -> None:
    ok_task(1)
    flaky_task(key)
    ok_task.map([1, 2, 3]).result()
    child_flow()
    cached_task()
    cached_task()
    bad_task(return_state=True)


@flow
def failing_flow() -> None:
    raise RuntimeError("flow fails")


renamed_task = ok_task.with_options(name="renamed_task")


@flow(name="with-options-flow")
def with_options_flow() -> int:
    return renamed_task(5)
