"""A DAG with a schedule whose first run is years away: the scheduler computes
its next run, and never runs it during the test."""

from __future__ import annotations

from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.operators.empty import EmptyOperator

with DAG("e2e_scheduled", start_date=datetime(2030, 1, 1), schedule=timedelta(hours=1),
         catchup=False) as dag:
    EmptyOperator(task_id="nothing")
