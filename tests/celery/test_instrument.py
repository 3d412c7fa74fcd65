"""instrument()/uninstrument() in-process, with eager execution (no worker needed)."""

from __future__ import annotations

import pytest
from celery import Celery
from forking import fork_with_locks_held
from gateway import Pushgateway

import orchestrator_push as op
from orchestrator_push.celery import instrument, uninstrument


def make_app() -> Celery:
    app = Celery("eager", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True

    @app.task(name="eager.ok")
    def ok() -> int:
        return 1

    @app.task(name="eager.fail")
    def fail() -> None:
        raise RuntimeError("x")

    return app


def recorded() -> int:
    engine = op.get_engine()
    assert engine is not None
    return engine.stats().recorded


def test_instrument_is_idempotent_and_uninstrument_stops(pushgateway: Pushgateway,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_PUSH_URL", pushgateway.url)
    app = make_app()
    try:
        instrument(app)
        instrument(app)
        app.tasks["eager.ok"].delay()
        app.tasks["eager.fail"].delay()  # the task's failure stays the task's
        assert op.flush(10)
        assert recorded() == 2
        g = pushgateway.group(job="celery", flow="eager", task="eager.ok")
        assert g.value("orchestrator_task_last_status", status="success") == 1
        uninstrument(app)
        app.tasks["eager.ok"].delay()
        assert op.flush(10)
        assert recorded() == 2
        instrument(app)
        app.tasks["eager.ok"].delay()
        assert op.flush(10)
        assert recorded() == 3
    finally:
        uninstrument(app)


def test_app_conf_is_read_and_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app()
    app.conf.orchestrator_push_url = "http://127.0.0.1:9"
    app.conf.orchestrator_push_labels = {"team": "data"}
    app.conf.orchestrator_push_job = "from-conf"
    monkeypatch.setenv("ORCHESTRATOR_PUSH_JOB", "from-env")
    try:
        instrument(app)
        engine = op.get_engine()
        assert engine is not None
        assert engine.config.url == "http://127.0.0.1:9"
        assert dict(engine.config.labels) == {"team": "data"}
        assert engine.config.job == "from-env"
    finally:
        uninstrument(app)


def test_invalid_conf_fails_at_instrument(monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app()
    app.conf.orchestrator_push_interval = "-1"
    with pytest.raises(op.ConfigError, match="ORCHESTRATOR_PUSH_INTERVAL"):
        instrument(app)


def test_a_child_forked_while_the_adapter_lock_is_held_does_not_deadlock(
        pushgateway: Pushgateway) -> None:
    p = fork_with_locks_held(pushgateway.url, "logs", "runtime", "celery")
    assert p.stdout.strip() == "0", p.stdout + p.stderr
    g = pushgateway.group(job="exec", flow="forked", task="child")
    assert g.value("orchestrator_task_last_completion_timestamp_seconds") == 7.0
