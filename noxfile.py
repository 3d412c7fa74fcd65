"""One virtualenv per framework and version (Airflow and Prefect cannot share one).

`nox` runs every session; `nox -s core` runs one. The uv backend installs in seconds.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
# CI runs every Python the package claims; a machine without one says which
# sessions it skipped (nox lists them as "skipped" in its summary).
nox.options.error_on_missing_interpreters = os.environ.get("CI") == "true"
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
#: requires-python >= 3.10: the core runs on every minor since.
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff and mypy --strict on the package."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "orchestrator_push")
    session.run("mypy", "orchestrator_push")


@nox.session(python=PYTHONS)
def core(session: nox.Session) -> None:
    """The core and `exec` against a real Pushgateway."""
    session.install("-e", ".[dev]")
    session.run("pytest", "tests/core", *session.posargs)


@nox.session(python=PYTHON)
def counts(session: nox.Session) -> None:
    """Many concurrent short-lived processes counting on one host (a minute or two)."""
    session.install("-e", ".[dev]")
    session.run("pytest", "tests/counts", *session.posargs)


@nox.session
@nox.parametrize(("python", "celery"), [("3.11", "5.4"), ("3.11", "5.7"), ("3.12", "5.7")])
def celery(session: nox.Session, celery: str) -> None:
    """Real Celery workers on a real Redis broker."""
    # Each Celery minor with the kombu minor released beside it: a newer kombu's
    # Redis transport wants a redis-py that Celery 5.4's extra does not allow.
    session.install("-e", ".[dev]", f"celery[redis]=={celery}.*", f"kombu=={celery}.*")
    session.run("pytest", "tests/celery", "--ignore=tests/celery/test_green.py", *session.posargs)


@nox.session(python="3.11")
@nox.parametrize("pool", ["gevent", "eventlet"])
def celery_green(session: nox.Session, pool: str) -> None:
    """Real Celery workers with the gevent or eventlet pool."""
    session.install("-e", ".[dev]", "celery[redis]==5.7.*", "kombu==5.7.*", pool)
    session.env["TEST_GREEN_POOL"] = pool
    session.run("pytest", "tests/celery/test_green.py", *session.posargs)


PREFECT_NEWEST = "3.9"


@nox.session
@nox.parametrize(("python", "prefect"), [("3.11", "3.8"), ("3.11", PREFECT_NEWEST),
                                         ("3.12", PREFECT_NEWEST)])
def prefect(session: nox.Session, prefect: str) -> None:
    """Real flows on Prefect's ephemeral API server, and deployments on a real
    `prefect server` with a real process worker."""
    # Prefect 3.8's server breaks on FastAPI releases newer than it knows
    # (`Body(min_items=...)` removed), and its scheduler service on SQLAlchemy 2.1
    # ("Can't evaluate bulk DML statement": no scheduled run is ever created);
    # 3.9 bounds FastAPI itself and works with SQLAlchemy 2.1.
    pins = ["fastapi<0.151", "sqlalchemy<2.1"] if prefect == "3.8" else []
    session.install("-e", ".[dev]", f"prefect=={prefect}.*", *pins)
    session.env.update({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    # The deployment tests and the detection matrix (a server, a worker, a serve
    # process: minutes) run once per Prefect version; the Python version changes
    # nothing they exercise.
    skip = ([f"--ignore=tests/prefect/{t}.py" for t in ("test_deployment", "test_prefect_matrix")]
            if session.python != "3.11" else [])
    # The detection matrix exercises the rules and routes on the newest Prefect;
    # what the older one reports is tested by its deployment tests.
    if prefect != PREFECT_NEWEST:
        skip.append("--ignore=tests/prefect/test_prefect_matrix.py")
    session.run("pytest", "tests/prefect", *skip, *session.posargs)


@nox.session
@nox.parametrize(("python", "airflow"), [("3.11", "2.10"), ("3.11", "3.3"), ("3.12", "3.3")])
def airflow(session: nox.Session, airflow: str) -> None:
    """Real dag.test() runs and a real scheduler, the plugin loaded from its entry point."""
    # Airflow 3 keeps PythonOperator in the standard provider; 2.10 in its core.
    extra = [] if airflow.startswith("2.") else ["apache-airflow-providers-standard"]
    session.install("-e", ".[dev]", f"apache-airflow=={airflow}.*", *extra)
    # The real-scheduler tests and the detection matrix (minutes) run once per
    # Airflow version, as Prefect's do: the Python version changes nothing they exercise.
    skip = ([f"--ignore=tests/airflow/{t}.py" for t in ("test_deployment", "test_airflow_matrix")]
            if session.python != "3.11" else [])
    session.run("pytest", "tests/airflow", *skip, *session.posargs)


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """The examples of every framework, a real Pushgateway and Prometheus: the rules and the
    dashboard's queries. Each example runs in its own venv under .envs/ (scripts/story.py)."""
    session.install("-e", ".[dev]")
    session.run("pytest", "tests/e2e", *session.posargs)
