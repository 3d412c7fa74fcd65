"""`doctor --prometheus` against a real Prometheus: a job whose groups have
different histogram bucket sets (ORCHESTRATOR_PUSH_BUCKETS differs between its
processes) is named, with each set and the groups that have it."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from gateway import Prometheus, Pushgateway, start, wait_until

import orchestrator_push as op
from orchestrator_push import doctor
from orchestrator_push.config import load_config
from orchestrator_push.records import TaskRecord

QUERY = 'group by (instance, le) (orchestrator_task_duration_seconds_bucket{job="shop"})'


@pytest.fixture
def stack() -> Iterator[tuple[Pushgateway, Prometheus]]:
    gw = start()
    prom = None
    try:
        prom = Prometheus(gw.url)
        yield gw, prom
    finally:
        if prom is not None:
            prom.stop()
        gw.stop()


def node(gw: Pushgateway, name: str, buckets: str) -> None:
    """A node's counts pushed with these bounds, as a Celery worker's main process does."""
    e = op.Engine(load_config({}, url=gw.url, spool_dir="off", job="shop", buckets=buckets))
    try:
        e.register_node((("instance", name),), "celery", "worker")
        e.record_task(TaskRecord("celery", "shop", "t", "success", 1_700_000_000.0, 0.2),
                      cumulative=(("instance", name),))
        assert e.flush(10)
    finally:
        e.close(5)


def doctor_lines(gw: Pushgateway, prom: Prometheus) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = doctor.run(out, {"ORCHESTRATOR_PUSH_URL": gw.url, "ORCHESTRATOR_PUSH_SPOOL_DIR": "off"},
                      prometheus=prom.url)
    return code, [line for line in out.getvalue().splitlines() if "bucket set" in line
                  or "ORCHESTRATOR_PUSH_BUCKETS" in line]


def test_doctor_names_the_groups_of_a_job_with_another_bucket_set(
        stack: tuple[Pushgateway, Prometheus]) -> None:
    gw, prom = stack
    node(gw, "node1", "0.5,5")
    node(gw, "node2", "0.5,5")
    node(gw, "node3", "none")
    wait_until(lambda: len(prom.query(QUERY)) == 3 + 3 + 1, 30, what="every bucket scraped")
    code, lines = doctor_lines(gw, prom)
    assert code == 0  # a warning, not a failure
    assert lines == [
        "[warn] one histogram bucket set per job: job 'shop': 0.5,5,+Inf (node1, node2); "
        "+Inf (node3)",
        "       fix: set the same ORCHESTRATOR_PUSH_BUCKETS in every process of a job: "
        "histogram_quantile over sum by (le) is wrong for the bounds some groups lack",
    ]
    node(gw, "node3", "0.5,5")  # its group replaced: the same bounds as the others
    wait_until(lambda: len(prom.query(QUERY)) == 3 * 3, 30, what="node3's new bounds scraped")
    assert doctor_lines(gw, prom) == (0, ["[  ok] one histogram bucket set per job: 1 job(s)"])
