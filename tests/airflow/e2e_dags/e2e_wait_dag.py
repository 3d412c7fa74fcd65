"""A DAG whose task runs until the test releases it (or kills it): its start must
be at the gateway while it runs (time limits set on the task and the DAG run)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.operators.python import PythonOperator


def _wait() -> None:
    release = os.environ["E2E_RELEASE"]
    with open(release + ".pid", "w") as f:  # for the test that kills this process
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 300
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.2)


with DAG("e2e_wait", start_date=datetime(2026, 1, 1), schedule=None, catchup=False,
         dagrun_timeout=timedelta(hours=1)) as dag:
    # one retry, at once: the test that kills the task kills each of its two tries
    PythonOperator(task_id="wait", python_callable=_wait, execution_timeout=timedelta(minutes=10),
                   retries=1, retry_delay=timedelta(seconds=1))
