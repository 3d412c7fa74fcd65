"""A DAG whose one task holds until its process is killed (the end-to-end
test SIGKILLs it, as an OOM kill would): its start reaches the gateway, its
end never does."""

from __future__ import annotations

import time
from datetime import datetime

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG


def hold() -> None:
    time.sleep(120)  # bounded: the test kills it long before


with DAG("airflow_vanishing", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    PythonOperator(task_id="hold", python_callable=hold)

if __name__ == "__main__":
    dag.test()
