"""Configuration: every bad value gives one error naming its variable; secrets never show."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from orchestrator_push import Config, ConfigError, load_config


def test_defaults_follow_the_spec() -> None:
    c = load_config({})
    assert c.url == "http://localhost:9091"
    assert c.job is None and c.job_for("celery") == "celery"
    assert c.namespace == "orchestrator"
    assert dict(c.labels) == {}
    assert c.enabled is True and c.tls_verify is True
    assert c.interval > 0 and c.timeout > 0 and c.flush_timeout > 0


def test_environment_values_are_read() -> None:
    c = load_config({
        "ORCHESTRATOR_PUSH_URL": "https://gw.example:9443/",
        "ORCHESTRATOR_PUSH_JOB": "etl",
        "ORCHESTRATOR_PUSH_NAMESPACE": "acme_batch",
        "ORCHESTRATOR_PUSH_LABELS": "env=prod, team=data",
        "ORCHESTRATOR_PUSH_INTERVAL": "2.5",
        "ORCHESTRATOR_PUSH_ENABLED": "false",
        "ORCHESTRATOR_PUSH_MAX_GROUPS": "50",
    })
    assert c.url == "https://gw.example:9443"
    assert c.job == "etl" and c.job_for("celery") == "etl"
    assert c.namespace == "acme_batch"
    assert dict(c.labels) == {"env": "prod", "team": "data"}
    assert c.interval == 2.5 and c.enabled is False and c.max_groups == 50


def test_precedence_overrides_then_env_then_fallback() -> None:
    env = {"ORCHESTRATOR_PUSH_JOB": "from-env"}
    fallback = {"ORCHESTRATOR_PUSH_JOB": "from-framework", "ORCHESTRATOR_PUSH_NAMESPACE": "fw"}
    assert load_config(env, fallback=fallback).job == "from-env"
    assert load_config(env, fallback=fallback).namespace == "fw"
    assert load_config(env, fallback=fallback, job="from-code").job == "from-code"
    assert load_config({}, fallback=fallback).job == "from-framework"


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("ORCHESTRATOR_PUSH_URL", "ftp://gw:21", "http"),
        ("ORCHESTRATOR_PUSH_URL", "gw:9091", "http"),
        ("ORCHESTRATOR_PUSH_URL", "http://gw:notaport", "URL"),
        ("ORCHESTRATOR_PUSH_URL", "http://gw:9091/?a=b", "query"),
        ("ORCHESTRATOR_PUSH_NAMESPACE", "9lives", "prefix"),
        ("ORCHESTRATOR_PUSH_NAMESPACE", "has-dash", "prefix"),
        ("ORCHESTRATOR_PUSH_LABELS", "env", "k=v"),
        ("ORCHESTRATOR_PUSH_LABELS", "env=prod,env=dev", "twice"),
        ("ORCHESTRATOR_PUSH_LABELS", "bad-name=x", "label name"),
        ("ORCHESTRATOR_PUSH_LABELS", "team=", "empty"),
        ("ORCHESTRATOR_PUSH_INTERVAL", "0", "greater than 0"),
        ("ORCHESTRATOR_PUSH_INTERVAL", "-1", "greater than 0"),
        ("ORCHESTRATOR_PUSH_INTERVAL", "soon", "number"),
        ("ORCHESTRATOR_PUSH_INTERVAL", "nan", "greater than 0"),
        ("ORCHESTRATOR_PUSH_TIMEOUT", "0", "greater than 0"),
        ("ORCHESTRATOR_PUSH_FLUSH_TIMEOUT", "-3", "greater than 0"),
        ("ORCHESTRATOR_PUSH_MAX_GROUPS", "1.5", "number"),
        ("ORCHESTRATOR_PUSH_ENABLED", "maybe", "true or false"),
        ("ORCHESTRATOR_PUSH_TLS_VERIFY", "sometimes", "true or false"),
        ("ORCHESTRATOR_PUSH_CA_BUNDLE", "/nonexistent/ca.pem", "not readable"),
        ("ORCHESTRATOR_PUSH_PASSWORD_FILE", "/nonexistent/pw", "cannot read"),
        ("ORCHESTRATOR_PUSH_BUCKETS", "1,0.5", "ascending"),
        ("ORCHESTRATOR_PUSH_BUCKETS", "1,1", "each once"),
        ("ORCHESTRATOR_PUSH_BUCKETS", "0,1", "greater than 0"),
        ("ORCHESTRATOR_PUSH_BUCKETS", "1,,5", "empty item"),
        ("ORCHESTRATOR_PUSH_BUCKETS", "1,+Inf", "always added"),
        ("ORCHESTRATOR_PUSH_BUCKETS", "fast,slow", "duration"),
        ("ORCHESTRATOR_PUSH_BUCKETS", ",".join(str(i) for i in range(1, 32)), "at most 30"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str, fragment: str) -> None:
    env = {variable: value}
    if variable == "ORCHESTRATOR_PUSH_PASSWORD_FILE":
        env["ORCHESTRATOR_PUSH_USERNAME"] = "u"
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(variable + ":")
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["job", "flow", "task", "framework", "status", "instance", "le",
                                  "__meta"])
def test_reserved_static_labels_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_LABELS") as info:
        load_config({"ORCHESTRATOR_PUSH_LABELS": f"{name}=x"})
    assert repr(name) in str(info.value)


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_INTERVAL"):
        load_config({}, interval=0)
    with pytest.raises(ConfigError, match="configure"):
        load_config({}, no_such_setting=1)


def test_auth_combinations() -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_PASSWORD"):
        load_config({"ORCHESTRATOR_PUSH_USERNAME": "u"})
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_BEARER_TOKEN"):
        load_config({"ORCHESTRATOR_PUSH_USERNAME": "u", "ORCHESTRATOR_PUSH_PASSWORD": "p",
                     "ORCHESTRATOR_PUSH_BEARER_TOKEN": "t"})


def test_secrets_never_show(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pw = tmp_path / "pw"
    pw.write_text("hunter2-from-file\n")
    c = load_config({"ORCHESTRATOR_PUSH_USERNAME": "alice",
                     "ORCHESTRATOR_PUSH_PASSWORD_FILE": str(pw)})
    assert c.password is not None and c.password.reveal() == "hunter2-from-file"
    assert "hunter2" not in repr(c) and "hunter2" not in str(c)

    c2 = load_config({"ORCHESTRATOR_PUSH_URL": "http://bob:s3cr%40t@gw:9091"})
    assert c2.url == "http://gw:9091" and c2.username == "bob"
    assert c2.password is not None and c2.password.reveal() == "s3cr@t"
    assert "s3cr" not in repr(c2)

    c3 = load_config({"ORCHESTRATOR_PUSH_BEARER_TOKEN": "tok-abc123"})
    assert "tok-abc123" not in repr(c3)

    with pytest.raises(ConfigError) as info:
        load_config({"ORCHESTRATOR_PUSH_URL": "http://bob:topsecret@gw:bad"})
    assert "topsecret" not in str(info.value)
    assert all("topsecret" not in r.getMessage() for r in caplog.records)


def test_tls_verification_off_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator_push"):
        c = load_config({"ORCHESTRATOR_PUSH_URL": "https://gw:9091",
                         "ORCHESTRATOR_PUSH_TLS_VERIFY": "false"})
    assert c.tls_verify is False
    assert any("verification is OFF" in r.getMessage() for r in caplog.records)


def test_config_is_a_plain_value() -> None:
    assert load_config({}) == Config()


# -- every configuration path goes through the same parsing ---------------------------


def test_credentials_in_a_url_given_in_code_are_taken_out(caplog: pytest.LogCaptureFixture) -> None:
    c = load_config({}, url="http://user:s3cret@gw:9091/")
    assert c.url == "http://gw:9091" and c.username == "user"
    assert c.password is not None and c.password.reveal() == "s3cret"
    assert "s3cret" not in repr(c)
    import orchestrator_push as op
    e = op.Engine(c)
    try:
        assert "s3cret" not in repr(e)
    finally:
        e.close(0)


def test_a_config_built_directly_is_checked_too() -> None:
    from orchestrator_push import Config
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_URL") as info:
        Config(url="http://user:s3cret@gw:9091")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_URL"):
        Config(url="ftp://gw:21")


@pytest.mark.parametrize("url", ["ftp://gw:21", "gw:9091", "http://gw:9091/?a=b"])
def test_code_and_environment_refuse_the_same_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_URL"):
        load_config({}, url=url)
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_URL"):
        load_config({"ORCHESTRATOR_PUSH_URL": url})


@pytest.mark.parametrize("off", ["off", "OFF", "none", "false", None, False])
def test_spool_off_in_code(off: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config({}, spool_dir=off).spool_dir is None
    assert not (tmp_path / "off").exists()


def test_code_values_are_parsed_like_the_variables() -> None:
    c = load_config({}, interval="2.5", enabled="false", labels="team=data, env=prod",
                    max_groups="50", password="pw", username="u")
    assert (c.interval, c.enabled, dict(c.labels), c.max_groups) == (
        2.5, False, {"team": "data", "env": "prod"}, 50)
    assert c.password is not None and c.password.reveal() == "pw"
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_MAX_GROUPS"):
        load_config({}, max_groups=1.5)
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_ENABLED"):
        load_config({}, enabled="maybe")
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PUSH_LABELS"):
        load_config({}, labels={"job": "x"})


def test_a_password_in_code_wins_over_a_password_file_elsewhere(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    env = {"ORCHESTRATOR_PUSH_USERNAME": "u", "ORCHESTRATOR_PUSH_PASSWORD_FILE": str(pw)}
    assert load_config(env).password.reveal() == "from-file"  # type: ignore[union-attr]
    assert load_config(env, password="code").password.reveal() == "code"  # type: ignore[union-attr]


def test_a_framework_value_names_where_it_was_set() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, fallback={"ORCHESTRATOR_PUSH_INTERVAL": "soon"},
                    fallback_source="app.conf.orchestrator_push_{name}")
    assert info.value.variable == "ORCHESTRATOR_PUSH_INTERVAL"
    assert "app.conf.orchestrator_push_interval" in str(info.value)


def test_bucket_bounds_from_every_source() -> None:
    assert load_config({}).buckets == (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                                        300, 600, 1800, 3600)
    assert load_config({"ORCHESTRATOR_PUSH_BUCKETS": " 0.5, 5 ,1m,1h"}).buckets == (
        0.5, 5.0, 60.0, 3600.0)
    assert load_config({"ORCHESTRATOR_PUSH_BUCKETS": "none"}).buckets == ()
    assert load_config({}, buckets=[0.1, 2]).buckets == (0.1, 2.0)
    assert load_config({}, buckets="off").buckets == ()
    assert load_config({}, fallback={"ORCHESTRATOR_PUSH_BUCKETS": "2,4"}).buckets == (2.0, 4.0)
    with pytest.raises(ConfigError) as info:
        load_config({}, fallback={"ORCHESTRATOR_PUSH_BUCKETS": "4,2"},
                    fallback_source="airflow.cfg [orchestrator_push] {name}")
    assert info.value.variable == "ORCHESTRATOR_PUSH_BUCKETS"
    assert "airflow.cfg [orchestrator_push] buckets" in str(info.value)
    for bad in (5, [1, True], [2, 1], [float("inf")], (0.5,) * 2):
        with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_PUSH_BUCKETS: "):
            load_config({}, buckets=bad)
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_PUSH_BUCKETS: "):
        Config(buckets=(3.0, 1.0))
