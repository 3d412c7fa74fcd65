"""An ordinary DAG: nothing in it mentions orchestrator-push. Installing
`orchestrator-push[airflow]` registers the listener plugin that reports it."""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.operators.python import PythonOperator


def extract(ti=None) -> int:  # type: ignore[no-untyped-def]  # Airflow passes the task instance
    if ti is not None and ti.try_number == 1:
        raise ConnectionError("flaky source")  # try 1 fails -> status="retry", then success
    return 42


def load() -> None:
    print("loaded")


def report() -> None:
    raise RuntimeError("report server unreachable")  # status="failed": the DAG run fails


with DAG("example_etl", start_date=datetime(2026, 1, 1), schedule="@daily", catchup=False) as dag:
    e = PythonOperator(task_id="extract", python_callable=extract, retries=2, retry_delay=0)
    lo = PythonOperator(task_id="load", python_callable=load)
    rep = PythonOperator(task_id="report", python_callable=report)
    e >> lo >> rep

if __name__ == "__main__":
    dag.test()
