"""A DAG whose runs hold one of each outcome a try can have: a retry then a
success, a failure, an upstream failure, a branch, a short-circuit and a
trigger rule that skip, and a marker the scheduler sets to success without
running it. The counting test triggers
several runs of it at once on a real scheduler."""

from __future__ import annotations

from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.providers.standard.operators.python import (
        BranchPythonOperator,
        PythonOperator,
        ShortCircuitOperator,
    )
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.operators.empty import EmptyOperator
    from airflow.operators.python import BranchPythonOperator, PythonOperator, ShortCircuitOperator


def _flaky(ti=None) -> None:  # type: ignore[no-untyped-def]  # Airflow passes the task instance
    if ti is not None and ti.try_number == 1:
        raise ConnectionError("try 1 fails")


def _boom() -> None:
    raise ValueError("fails on purpose")


def _done() -> None:
    pass


with DAG("e2e_counts", start_date=datetime(2026, 1, 1), schedule=None, catchup=False,
         max_active_runs=4) as dag:
    PythonOperator(task_id="flaky", python_callable=_flaky, retries=1,
                   retry_delay=timedelta(0))
    boom = PythonOperator(task_id="boom", python_callable=_boom)
    after = PythonOperator(task_id="after_boom", python_callable=_done)
    pick = BranchPythonOperator(task_id="pick", python_callable=lambda: "chosen")
    chosen = PythonOperator(task_id="chosen", python_callable=_done)
    other = PythonOperator(task_id="not_chosen", python_callable=_done)
    boom >> after
    pick >> [chosen, other]
    EmptyOperator(task_id="marker")
    gate = ShortCircuitOperator(task_id="gate", python_callable=lambda: False)
    gate >> PythonOperator(task_id="gated", python_callable=_done)
    chosen >> PythonOperator(task_id="on_failure", python_callable=_done,
                             trigger_rule="all_failed")
