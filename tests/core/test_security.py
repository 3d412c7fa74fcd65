"""TLS and auth against a real Pushgateway started with --web.config.file, and no
secret in any log line, repr or error text."""

from __future__ import annotations

import base64
import io
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from gateway import Pushgateway, free_port, start
from proxy import Proxy
from tls import Certs, make_certs, web_config

import orchestrator_push as op
from orchestrator_push import doctor
from orchestrator_push.records import TaskRecord

NS = "orchestrator"
PASSWORD = "pw-SECRET-7f3a"
TOKEN = "tok-SECRET-91c2"
SECRETS = (PASSWORD, TOKEN)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def secure_gateway(tmp: str, certs: Certs | None, users: dict[str, str] | None = None,
                   client_certs: bool = False) -> Pushgateway:
    config = web_config(tmp, certs, users, client_certs)
    ctx = None
    if certs is not None:
        ctx = ssl.create_default_context(cafile=certs.ca)
        if client_certs:
            ctx.load_cert_chain(certs.client_cert, certs.client_key)
    headers = {}
    if users:
        user, pw = next(iter(users.items()))
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    return start(extra_args=[f"--web.config.file={config}"], context=ctx, headers=headers)


@pytest.fixture
def tls_gw(tmp_path: object, certs: Certs) -> Iterator[Pushgateway]:
    gw = secure_gateway(str(tmp_path), certs)
    yield gw
    gw.stop()


@pytest.fixture
def auth_gw(tmp_path: object, certs: Certs) -> Iterator[Pushgateway]:
    gw = secure_gateway(str(tmp_path), certs, users={"pusher": PASSWORD})
    yield gw
    gw.stop()


def push_one(url: str, task: str = "load", **kw: object) -> op.Engine:
    kw.setdefault("spool_dir", None)
    e = op.Engine(op.load_config({}, url=url, interval=0.05, timeout=2, **kw))
    e.record_task(TaskRecord("exec", "secure", task, "success", 1000.0, 1.0))
    return e


def test_tls_with_a_custom_ca_bundle(tls_gw: Pushgateway, certs: Certs) -> None:
    assert tls_gw.url.startswith("https://")
    e = push_one(tls_gw.url, ca_bundle=certs.ca)
    assert e.flush(10)
    e.close(0)
    assert tls_gw.group(job="exec", flow="secure", task="load")


def test_tls_verification_is_on_by_default(tls_gw: Pushgateway) -> None:
    e = push_one(tls_gw.url)  # the system CAs do not know our test CA
    assert e.flush(2) is False
    assert e.stats().push_failures["tls"] >= 1
    e.close(0)
    assert tls_gw.groups() == []
    out = io.StringIO()
    assert doctor.run(out, {"ORCHESTRATOR_PUSH_URL": tls_gw.url}) == 1
    assert "TLS error" in out.getvalue() and "ORCHESTRATOR_PUSH_CA_BUNDLE" in out.getvalue()


def test_turning_verification_off_warns(tls_gw: Pushgateway,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator_push"):
        e = push_one(tls_gw.url, tls_verify=False)
    assert "TLS certificate verification is OFF" in caplog.text
    assert e.flush(10)
    e.close(0)


def test_basic_auth(auth_gw: Pushgateway, certs: Certs) -> None:
    e = push_one(auth_gw.url, ca_bundle=certs.ca, username="pusher", password=PASSWORD)
    assert e.flush(10)
    e.close(0)
    assert auth_gw.group(job="exec", flow="secure", task="load")
    out = io.StringIO()
    env = {"ORCHESTRATOR_PUSH_URL": auth_gw.url, "ORCHESTRATOR_PUSH_CA_BUNDLE": certs.ca,
           "ORCHESTRATOR_PUSH_USERNAME": "pusher", "ORCHESTRATOR_PUSH_PASSWORD": PASSWORD}
    assert doctor.run(out, env) == 0, out.getvalue()


def test_password_from_a_file(auth_gw: Pushgateway, certs: Certs, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "pw")
    with open(path, "w") as f:
        f.write(PASSWORD + "\n")
    config = op.load_config({"ORCHESTRATOR_PUSH_URL": auth_gw.url,
                             "ORCHESTRATOR_PUSH_CA_BUNDLE": certs.ca,
                             "ORCHESTRATOR_PUSH_USERNAME": "pusher",
                             "ORCHESTRATOR_PUSH_PASSWORD_FILE": path}, spool_dir=None)
    e = op.Engine(config)
    e.record_task(TaskRecord("exec", "secure", "file", "success", 1.0, 1.0))
    assert e.flush(10)
    e.close(0)


def test_wrong_password_one_clear_error_no_retry_storm(
        auth_gw: Pushgateway, certs: Certs, tmp_path: object,
        caplog: pytest.LogCaptureFixture) -> None:
    spool = os.path.join(str(tmp_path), "spool")
    with caplog.at_level(logging.DEBUG, logger="orchestrator_push"):
        e = push_one(auth_gw.url, ca_bundle=certs.ca, username="pusher", password="wrong",
                     spool_dir=spool)
        assert e.flush(10) is True  # not delivered, but kept in the spool
        failures = e.stats().push_failures["http_401"]
        time.sleep(1.0)  # an observation window: no further attempt
        assert e.stats().push_failures["http_401"] == failures == 1
        assert e.stats().spooled == 1
        e.close(0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "refused the credentials (HTTP 401)" in errors[0].getMessage()
    assert "ORCHESTRATOR_PUSH_PASSWORD" in errors[0].getMessage()
    # fixed credentials: the next process delivers what was kept
    e = push_one(auth_gw.url, task="other", ca_bundle=certs.ca, username="pusher",
                 password=PASSWORD, spool_dir=spool)
    assert e.flush(10)
    e.close(0)
    assert {g.labels["task"] for g in auth_gw.groups()} == {"load", "other"}
    assert os.listdir(spool) == []


def test_client_certificates(tmp_path: object, certs: Certs) -> None:
    gw = secure_gateway(str(tmp_path), certs, client_certs=True)
    try:
        e = push_one(gw.url, ca_bundle=certs.ca)  # no client certificate: refused
        assert e.flush(2) is False
        assert e.stats().push_failures["tls"] + e.stats().push_failures["connection"] >= 1
        e.close(0)
        e = push_one(gw.url, ca_bundle=certs.ca, client_cert=certs.client_cert,
                     client_key=certs.client_key)
        assert e.flush(10)
        e.close(0)
        assert gw.group(job="exec", flow="secure", task="load")
    finally:
        gw.stop()


def test_bearer_token_goes_in_a_header(pushgateway: Pushgateway) -> None:
    proxy = Proxy(pushgateway.port)  # the Pushgateway does not check tokens: a proxy would
    try:
        e = push_one(proxy.url, bearer_token=TOKEN)
        assert e.flush(10)
        e.close(0)
        assert f"Authorization: Bearer {TOKEN}".encode() in bytes(proxy.sent)
    finally:
        proxy.stop()


def test_no_secret_in_logs_reprs_or_errors(auth_gw: Pushgateway, certs: Certs,
                                           caplog: pytest.LogCaptureFixture,
                                           tmp_path: object) -> None:
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        # wrong password (401), untrusted TLS, nothing listening: every failure path
        for kw in ({"ca_bundle": certs.ca, "password": TOKEN}, {"password": PASSWORD}, {}):
            url = auth_gw.url if kw else f"http://127.0.0.1:{free_port()}"
            e = push_one(url, username="pusher", **{"password": PASSWORD, **kw},
                         spool_dir=str(tmp_path))
            e.flush(1.5)
            texts += [repr(e), repr(e.config), str(e.config), repr(e.stats())]
            e.close(0)
        e = push_one(auth_gw.url, bearer_token=TOKEN, ca_bundle=certs.ca)
        e.flush(1.5)
        texts += [repr(e.config), str(e.config)]
        e.close(0)
        # a password in the URL is taken out of it
        url = auth_gw.url.replace("https://", f"https://pusher:{PASSWORD}@")
        config = op.load_config({"ORCHESTRATOR_PUSH_URL": url})
        texts += [config.url, repr(config)]
        # configuration errors around secrets
        for env in ({"ORCHESTRATOR_PUSH_PASSWORD": PASSWORD},
                    {"ORCHESTRATOR_PUSH_BEARER_TOKEN": TOKEN, "ORCHESTRATOR_PUSH_USERNAME": "u",
                     "ORCHESTRATOR_PUSH_PASSWORD": PASSWORD}):
            with pytest.raises(op.ConfigError) as exc:
                op.load_config(env)
            texts.append(str(exc.value))
        out = io.StringIO()
        doctor.run(out, {"ORCHESTRATOR_PUSH_URL": auth_gw.url, "ORCHESTRATOR_PUSH_USERNAME": "u",
                         "ORCHESTRATOR_PUSH_PASSWORD": PASSWORD,
                         "ORCHESTRATOR_PUSH_CA_BUNDLE": certs.ca})
        texts.append(out.getvalue())
    texts.append(caplog.text)
    p = subprocess.run([sys.executable, "-m", "orchestrator_push", "exec", "-v", "--job", "j",
                        "--", "true"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "ORCHESTRATOR_PUSH_URL": url,
                            "ORCHESTRATOR_PUSH_CA_BUNDLE": certs.ca,
                            "ORCHESTRATOR_PUSH_PASSWORD": "wrong-" + PASSWORD,
                            "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "2"})
    texts += [p.stdout, p.stderr]
    assert "HTTP 401" in caplog.text or "401" in p.stderr  # the failures did happen
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
