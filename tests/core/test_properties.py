"""Property-based: any flow, task and label value goes through the whole path to the
real gateway and reads back intact, or is refused at configuration time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from gateway import Pushgateway, running
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import orchestrator_push as op
from orchestrator_push.records import TaskRecord

NS = "orchestrator"
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
_jobs = itertools.count()

# Any text: unicode, "/", quotes, backslashes, newlines, control characters,
# empty, long (hypothesis leaves out lone surrogates, which a str from a
# framework could still hold: tested separately below).
values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "/", "a/b/c", '"quoted"', "back\\slash", "new\nline", "\t", "=",
                     "@base64", "%2F", "..", " spaced ", "ünïcödé", "日本語", "🚀", "\x00"]),
    st.text(min_size=1000, max_size=3000),
)


@pytest.fixture(scope="module")
def gw() -> Iterator[Pushgateway]:
    yield from running()


def push(gw: Pushgateway, flow: str, task: str, labels: dict[str, str]) -> str:
    job = f"prop{next(_jobs)}"
    e = op.Engine(op.load_config({}, url=gw.url, job=job, labels=labels, interval=0.01,
                                 spool_dir=None))
    try:
        e.record_task(TaskRecord("exec", flow, task, "success", 1234.5, 2.5))
        assert e.flush(30), e.stats()
    finally:
        e.close(0)
    return job


def expected(value: str) -> str:
    return value if value else "(empty)"


@SETTINGS
@given(flow=values, task=values)
@example(flow=".", task="..")
@example(flow="", task="")
def test_any_flow_and_task_reads_back_intact(gw: Pushgateway, flow: str, task: str) -> None:
    job = push(gw, flow, task, {})
    [g] = [g for g in gw.groups() if g.labels.get("job") == job]
    assert g.labels == {"job": job, "flow": expected(flow), "task": expected(task)}
    [(labels, value)] = g.metrics[f"{NS}_task_last_duration_seconds"]
    assert value == 2.5
    assert labels["flow"] == expected(flow) and labels["task"] == expected(task)


label_names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,20}", fullmatch=True).filter(
    lambda n: n not in ("job", "flow", "task", "instance", "framework", "status", "le",
                        "reason") and not n.startswith("__"))


@SETTINGS
@given(labels=st.dictionaries(label_names, values.filter(bool), max_size=3))
@example(labels={"a": ".", "b": ".."})
def test_any_static_label_value_reads_back_intact(gw: Pushgateway,
                                                  labels: dict[str, str]) -> None:
    job = push(gw, "f", "t", labels)
    [g] = [g for g in gw.groups() if g.labels.get("job") == job]
    assert g.labels == {"job": job, "flow": "f", "task": "t", **labels}


@SETTINGS
@given(name=st.one_of(st.text(max_size=20), label_names), value=values)
@example(name="env", value="")
@example(name="job", value="x")
@example(name="__x", value="x")
def test_a_bad_static_label_is_refused_at_configuration_time(name: str, value: str) -> None:
    try:
        config = op.load_config({}, labels={name: value})
    except op.ConfigError as exc:
        assert str(exc).startswith("ORCHESTRATOR_PUSH_LABELS: ")
        return
    # accepted: then it is a valid, non-reserved name with a non-empty value
    assert config.labels == {name: value} and value != ""


def test_lone_surrogates_are_replaced_not_fatal(gw: Pushgateway) -> None:
    job = push(gw, "bad\udcffbytes", "t\ud800", {})
    [g] = [g for g in gw.groups() if g.labels.get("job") == job]
    assert g.labels == {"job": job, "flow": "bad\ufffdbytes", "task": "t\ufffd"}
