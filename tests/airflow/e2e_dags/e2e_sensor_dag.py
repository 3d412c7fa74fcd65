"""A reschedule-mode sensor that pokes until the test lets it succeed: each poke
is a short try of its own, and its slot is given back in between."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

try:  # Airflow 3
    from airflow.providers.standard.sensors.python import PythonSensor
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.10
    from airflow import DAG
    from airflow.sensors.python import PythonSensor


def _poke() -> bool:
    base = os.environ["E2E_RELEASE"]
    with open(base + ".pokes", "a") as f:  # the test counts the pokes
        f.write(f"{time.time()}\n")
    return os.path.exists(base + ".sensor")


# poke_interval 30: Airflow 3.3's task runners often take ~5 s to exit after the
# poke (more on a loaded machine); with an interval shorter than that its
# scheduler can queue the next poke before it reads the executor's "success" for
# the last one, and then fails the task ("state changed externally"; seen at 1
# and 5 s).
with DAG("e2e_sensor", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    PythonSensor(task_id="wait", python_callable=_poke, mode="reschedule", poke_interval=30,
                 timeout=600, execution_timeout=timedelta(seconds=30))
