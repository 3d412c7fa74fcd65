"""The DAG the Airflow tests run with dag.test(); run as a script it tests `sample`."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG, task
    from airflow.sdk.exceptions import AirflowSkipException
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.decorators import task
    from airflow.exceptions import AirflowSkipException
    from airflow.operators.python import PythonOperator

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
    run = dag.test()
    # What Airflow recorded, for the tests to compare with what was pushed.
    states = {f"{ti.task_id}[{ti.map_index}]": str(getattr(ti.state, "value", ti.state))
              for ti in run.get_task_instances()}
    print("STATES " + json.dumps(states, sort_keys=True), f"RUN {run.state}")
    sys.exit(0)
