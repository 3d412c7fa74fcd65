"""A Prefect flow reporting every task and flow run; run it as-is:

    prometheus-pushgateway --web.listen-address=127.0.0.1:9091 --persistence.file= &
    ORCHESTRATOR_PUSH_URL=http://127.0.0.1:9091 python examples/prefect/etl_flow.py
    curl -s http://127.0.0.1:9091/metrics | grep '^orchestrator_'

Zero code instead of instrument(): PREFECT_PLUGINS_ENABLED=1 and remove the call.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.runtime import task_run

from orchestrator_push.prefect import instrument

instrument()


@task(retries=2, retry_delay_seconds=0)
def extract(day: str) -> list[int]:
    if task_run.run_count == 1:
        raise ConnectionError("flaky source")  # first try: status="retry", then success
    return list(range(10))


@task
def transform(rows: list[int]) -> list[int]:
    return [r * 2 for r in rows]


@task
def load(rows: list[int]) -> int:
    return len(rows)


@flow(name="daily-etl")
def daily_etl(day: str = "2026-11-25") -> int:
    return load(transform(extract(day)))


if __name__ == "__main__":
    print("loaded", daily_etl())
    # The process exits here; the atexit hook delivers before it does.
