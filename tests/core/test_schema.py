"""Pure functions of the schema: grouping paths and encoding."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator_push import schema
from orchestrator_push.records import FlowRecord, TaskRecord


@pytest.mark.parametrize(
    ("value", "segment"),
    [
        ("plain-name_1.2", "flow/plain-name_1.2"),
        ("", "flow@base64/="),
        ("a/b", "flow@base64/" + base64.urlsafe_b64encode(b"a/b").decode()),
        ("with space", "flow@base64/" + base64.urlsafe_b64encode(b"with space").decode()),
        ("ünï", "flow@base64/" + base64.urlsafe_b64encode("ünï".encode()).decode()),
    ],
)
def test_group_path_encodes_values(value: str, segment: str) -> None:
    assert schema.group_path((("job", "j"), ("flow", value))) == f"/metrics/job/j/{segment}"


def test_encoding_has_no_created_series_and_fixed_help() -> None:
    rec = TaskRecord("celery", "app", "t", "success", 1000.0, 0.2)
    cum = schema.Cumulative()
    cum.add(rec)
    payload = {f.name: f for f in [*schema.task_families("orchestrator", rec),
                                   *cum.families("orchestrator")]}
    text = schema.encode(payload.values()).decode()
    assert "_created" not in text
    assert "# TYPE orchestrator_task_runs_total counter" in text
    assert "# TYPE orchestrator_task_duration_seconds histogram" in text
    assert 'orchestrator_task_duration_seconds_bucket{flow="app",framework="celery",le="0.25"' in text
    # HELP comes from one table: the same for a failure in another process.
    other = {f.name: f for f in schema.task_families("orchestrator", TaskRecord(
        "airflow", "d", "t", "failed", 5.0, 1.0))}
    for name, fam in other.items():
        if name in payload:
            assert fam.documentation == payload[name].documentation


def test_status_gauge_zeroes_every_other_status_of_the_framework() -> None:
    fams = {f.name: f for f in schema.task_families("ns", TaskRecord(
        "airflow", "d", "t", "skipped", 1.0, 0.0))}
    status = {s.labels["status"]: s.value for s in fams["ns_task_last_status"].samples}
    assert status == {"success": 0, "failed": 0, "retry": 0, "skipped": 1}
    assert "ns_task_last_success_timestamp_seconds" not in fams
    assert "ns_task_last_failure_timestamp_seconds" not in fams


def test_flow_families_and_failure_timestamp() -> None:
    fams = {f.name: f for f in schema.flow_families("ns", FlowRecord(
        "prefect", "f", "crashed", 7.0, 2.0))}
    assert fams["ns_flow_last_failure_timestamp_seconds"].samples[0].value == 7.0
    assert "ns_flow_last_success_timestamp_seconds" not in fams


def test_histogram_buckets_are_cumulative() -> None:
    cum = schema.Cumulative()
    for d in (0.001, 0.3, 0.3, 7200.0):
        cum.add(TaskRecord("celery", "a", "t", "success", 1.0, d))
    _runs, hist = cum.families("ns")
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets["0.01"] == 1 and buckets["0.25"] == 1 and buckets["0.5"] == 3
    assert buckets["3600.0"] == 3 and buckets["+Inf"] == 4


def test_chosen_bounds_are_the_only_buckets_and_none_keeps_count_and_sum() -> None:
    cum = schema.Cumulative((0.5, 5.0))
    for d in (0.001, 0.5, 0.6, 7200.0):
        cum.add(TaskRecord("celery", "a", "t", "success", 1.0, d))
    cum.add_flow(FlowRecord("celery", "a", "success", 1.0, 3.0))
    text = schema.encode(cum.families("ns")).decode()
    les = sorted({line.split('le="')[1].split('"')[0] for line in text.splitlines()
                  if "_bucket{" in line})
    assert les == ["+Inf", "0.5", "5.0"]
    _runs, hist, _flow_runs, flow_hist = cum.families("ns")
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.5": 2, "5.0": 3, "+Inf": 4}
    assert [s.value for s in flow_hist.samples if s.name.endswith("_bucket")] == [0, 1, 1]
    bare = schema.Cumulative(())
    bare.add(TaskRecord("celery", "a", "t", "success", 1.0, 2.0))
    samples = {(s.name, s.labels.get("le")): s.value for s in bare.families("ns")[1].samples}
    assert samples == {("ns_task_duration_seconds_bucket", "+Inf"): 1,
                       ("ns_task_duration_seconds_count", None): 1,
                       ("ns_task_duration_seconds_sum", None): 2.0}


def test_counts_kept_with_other_bounds_move_to_these() -> None:
    inf = float("inf")
    old = schema.Cumulative((0.1, 1.0, 10.0))
    for d in (0.05, 0.5, 0.5, 5.0, 50.0):
        old.add(TaskRecord("exec", "f", "t", "success", 1.0, d))
    coarse = schema.Cumulative((1.0,))
    coarse.absorb(old.dump(), [0.1, 1.0, 10.0])
    assert coarse.dump() == [{"labels": ["exec", "f", "t", "success"], "count": 5, "sum": 56.05,
                              "buckets": [3, 2]}]
    # not a subset: a count moves up to the next new bound (50 s, above the old
    # 10, lands in +Inf, not at 100); at the bound both have (1) it is unchanged
    other = schema.Cumulative((0.5, 1.0, 100.0))
    other.absorb(old.dump(), [0.1, 1.0, 10.0])
    assert other.dump()[0]["buckets"] == [1, 2, 1, 1]
    assert schema.rebucket([1.0, 5.0, inf], [1, 1, 1], [2.0, 5.0, inf]) == [1, 1, 1]
    for bad in ([1.0, 0.5], [True], "1,2", [0.0]):
        with pytest.raises(ValueError):
            other.absorb(old.dump(), bad)  # type: ignore[arg-type]
    assert len(other) == 5


_bounds = st.lists(st.sampled_from([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0, 300.0, 3600.0]),
                   max_size=8, unique=True).map(lambda b: (*sorted(b), float("inf")))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(old=_bounds, new=_bounds, data=st.data())
def test_rebucketing_keeps_the_total_and_what_is_known_below_each_bound(
        old: tuple[float, ...], new: tuple[float, ...], data: st.DataObject) -> None:
    counts = data.draw(st.lists(st.integers(0, 50), min_size=len(old), max_size=len(old)))
    moved = schema.rebucket(old, counts, new)
    assert sum(moved) == sum(counts)

    def at_or_below(bounds: tuple[float, ...], per: list[int], b: float) -> int:
        return sum(n for bound, n in zip(bounds, per, strict=True) if bound <= b)

    # at every new bound: exactly what was known to be at or below it (so a
    # bound both sets have keeps its count, and nothing moves down)
    for b in new:
        assert at_or_below(new, moved, b) == at_or_below(old, counts, b)
