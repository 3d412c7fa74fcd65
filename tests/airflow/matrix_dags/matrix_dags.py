"""The detection matrix's DAGs (tests/airflow/test_airflow_matrix.py): one that
fails, two whose task the test stops or kills (its pid in $MATRIX_PIDS), one
every 30 s."""

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

START = datetime(2026, 1, 1)


def _fail() -> None:
    raise RuntimeError("m_failed fails, as planned")


def _wait(dag_id: str) -> None:
    with open(os.path.join(os.environ["MATRIX_PIDS"], dag_id), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


with DAG("m_failed", start_date=START, schedule=None, catchup=False):
    PythonOperator(task_id="boom", python_callable=_fail, retries=0)

with DAG("m_hung", start_date=START, schedule=None, catchup=False):
    PythonOperator(task_id="stuck", python_callable=_wait, op_args=["m_hung"], retries=0,
                   execution_timeout=timedelta(seconds=3))

with DAG("m_vanish", start_date=START, schedule=None, catchup=False):
    PythonOperator(task_id="victim", python_callable=_wait, op_args=["m_vanish"], retries=0)

with DAG("m_every30", start_date=START, schedule=timedelta(seconds=30), catchup=False):
    PythonOperator(task_id="tick", python_callable=lambda: None)
