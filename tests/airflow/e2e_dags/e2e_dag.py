"""The DAG the end-to-end test triggers on a real scheduler with LocalExecutor."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.operators.python import PythonOperator


def _hello() -> str:
    return "hello"


def _broken() -> None:
    raise ValueError("broken on purpose")


with DAG("e2e", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    PythonOperator(task_id="hello", python_callable=_hello)
    PythonOperator(task_id="broken", python_callable=_broken)
