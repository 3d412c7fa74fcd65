"""The DAG the Airflow tests run with dag.test(); run as a script it tests `sample`."""

from __future__ import annotations

import os
import sys
from datetime import datetime

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, task
from airflow.sdk.exceptions import AirflowSkipException

MARKER = os.environ.get("SAMPLE_MARKER_DIR", "/tmp")


def _ok() -> str:
    return "ok"


def _fail() -> None:
    raise ValueError("boom")


def _flaky() -> str:
    path = os.path.join(MARKER, "flaky-ran-once")
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first try fails")
    return "ok"


def _skip() -> None:
    raise AirflowSkipException("nothing to do")


with DAG("sample", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    PythonOperator(task_id="ok", python_callable=_ok)
    PythonOperator(task_id="fail", python_callable=_fail)
    PythonOperator(task_id="flaky", python_callable=_flaky, retries=1, retry_delay=0)
    PythonOperator(task_id="skip", python_callable=_skip)

    @task
    def double(x: int) -> int:
        return 2 * x

    double.expand(x=[1, 2, 3])


if __name__ == "__main__":
    dag.test()
    sys.exit(0)
