"""The group table on its own (pure data: no threads, no I/O): property tests.

Whatever the interleaving of folds, snapshots and commits (a push in flight
while records arrive), what the pushes carried ends with the newest record,
the newest success and the newest failure of every group, and nothing stays
pending once every snapshot is committed.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator_push.records import TaskRecord
from orchestrator_push.table import Snapshot, Table

NS = "orchestrator"

folds = st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["success", "failed", "retry"]),
                  st.integers(0, 50))
steps = st.lists(st.one_of(st.tuples(st.just("fold"), folds),
                           st.tuples(st.just("snapshot"), st.none()),
                           st.tuples(st.just("commit"), st.integers(0, 5))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_what_is_pushed_ends_with_the_newest_values(script: list[tuple[str, object]]) -> None:
    table = Table(None, {}, max_groups=100)
    in_flight: list[Snapshot] = []
    sent: dict[str, dict[str, float]] = {}  # task -> what the gateway would hold
    newest: dict[str, dict[str, float]] = {}

    def deliver(snap: Snapshot) -> None:
        task = dict(snap.group.key)["task"]
        held = sent.setdefault(task, {})
        if snap.last is not None:  # a POST replaces these names
            held["completion"] = snap.last.end_time
        if snap.success_at is not None:
            held["success"] = snap.success_at
        if snap.failure_at is not None:
            held["failure"] = snap.failure_at
        table.commit(snap)

    for op, arg in script:
        if op == "fold":
            task, status, end = arg  # type: ignore[misc]
            table.fold_task(TaskRecord("exec", "f", task, status, float(end), 1.0), None)
            n = newest.setdefault(task, {})
            n["completion"] = max(n.get("completion", -1.0), float(end))
            if status == "success":
                n["success"] = max(n.get("success", -1.0), float(end))
            if status == "failed":
                n["failure"] = max(n.get("failure", -1.0), float(end))
        elif op == "snapshot":
            in_flight += [table.snapshot(g, NS) for g in table.dirty()
                          if all(s.group is not g for s in in_flight)]
        elif in_flight:  # the answer to one push in flight
            deliver(in_flight.pop(int(arg) % len(in_flight)))  # type: ignore[call-overload]
    while in_flight:
        deliver(in_flight.pop())
    for g in table.dirty():  # the sender's last cycle
        deliver(table.snapshot(g, NS))
    assert table.pending() == 0 and table.dirty() == [] and table.settled() == table.seq
    for task, n in newest.items():
        held = sent[task]
        assert held["completion"] == n["completion"]
        assert held.get("success") == n.get("success")
        assert held.get("failure") == n.get("failure")


def test_a_group_past_the_cap_evicts_only_delivered_groups() -> None:
    table = Table(None, {}, max_groups=2)
    assert table.fold_task(TaskRecord("exec", "f", "a", "success", 1.0, 1.0), None)
    assert table.fold_task(TaskRecord("exec", "f", "b", "success", 1.0, 1.0), None)
    assert not table.fold_task(TaskRecord("exec", "f", "c", "success", 1.0, 1.0), None)
    for g in table.dirty():
        table.commit(table.snapshot(g, NS))
    assert table.fold_task(TaskRecord("exec", "f", "c", "success", 1.0, 1.0), None)
    assert len(table) == 2
