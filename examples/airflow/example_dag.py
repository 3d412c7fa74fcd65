"""An ordinary DAG: nothing in it mentions orchestrator-push. Installing
`orchestrator-push[airflow]` registers the listener plugin that reports it."""

from __future__ import annotations

import random
from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.operators.python import PythonOperator


def extract() -> int:
    if random.random() < 0.3:
        raise ConnectionError("flaky source")  # try 1 fails -> status="retry"
    return 42


def load() -> None:
    print("loaded")


with DAG("example_etl", start_date=datetime(2026, 1, 1), schedule="@daily", catchup=False) as dag:
    e = PythonOperator(task_id="extract", python_callable=extract, retries=2, retry_delay=0)
    lo = PythonOperator(task_id="load", python_callable=load)
    e >> lo

if __name__ == "__main__":
    dag.test()
