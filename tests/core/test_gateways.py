"""Several gateways (ORCHESTRATOR_PUSH_URL lists them): groups spread by
rendezvous hashing, replicas, one gateway stopped, and the ops commands across
all of them. Real Pushgateways on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from gateway import Pushgateway, start, wait_until
from test_exec import cli

import orchestrator_push as op
from orchestrator_push import admin, doctor, schema
from orchestrator_push.config import ConfigError, load_config
from orchestrator_push.gateways import rank
from orchestrator_push.records import TaskRecord

NS = "orchestrator"


def urls(gws: list[Pushgateway]) -> str:
    return ",".join(gw.url for gw in gws)


def task_path(job: str) -> str:
    return schema.group_path((("job", job), ("flow", job), ("task", "main")))


def holders(gws: list[Pushgateway], job: str) -> list[int]:
    """Which of the gateways hold the exec task group of ``job`` (its host's
    counts group is a group of its own, spread on its own)."""
    key = {"job": job, "flow": job, "task": "main"}
    return [i for i, gw in enumerate(gws) if any(g.labels == key for g in gw.groups())]


def expected(gws: list[Pushgateway], job: str, replicas: int) -> list[int]:
    return sorted(rank([gw.url for gw in gws], task_path(job))[:replicas])


def exec_run(url: str, job: str, *, replicas: int = 1, code: int = 0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "ORCHESTRATOR_PUSH_URL": url,
            "ORCHESTRATOR_PUSH_REPLICAS": str(replicas), **(env or {})}
    return subprocess.run([*cli(), "exec", "--job", job, "--", sys.executable, "-c",
                           f"import sys; sys.exit({code})"],
                          env=full, capture_output=True, text=True, timeout=60)


# -- rendezvous hashing (pure) -----------------------------------------------------------

GWS = [f"http://gw{i}:9091" for i in range(3)]
PATHS = [task_path(f"job{i}") for i in range(3000)]


def test_rank_is_stable_and_ignores_the_order_of_the_list() -> None:
    rev = GWS[::-1]
    for path in PATHS[:200]:
        assert [rev[i] for i in rank(rev, path)] == [GWS[i] for i in rank(GWS, path)]


def test_groups_spread_evenly() -> None:
    counts = [0, 0, 0]
    for path in PATHS:
        counts[rank(GWS, path)[0]] += 1
    assert all(900 <= c <= 1100 for c in counts), counts  # 1000 each, within 10 %


def test_adding_a_gateway_moves_only_the_groups_it_takes() -> None:
    more = [*GWS, "http://gw3:9091"]
    moved = 0
    for path in PATHS:
        before, after = GWS[rank(GWS, path)[0]], more[rank(more, path)[0]]
        if before != after:
            assert after == "http://gw3:9091"  # nothing moves between the old ones
            moved += 1
    assert 600 <= moved <= 900, moved  # a quarter of 3000


def test_removing_a_gateway_moves_only_its_groups() -> None:
    fewer = GWS[:2]
    for path in PATHS:
        before = GWS[rank(GWS, path)[0]]
        if before != GWS[2]:
            assert fewer[rank(fewer, path)[0]] == before


def test_replicas_are_the_next_in_rank_so_a_lost_gateway_leaves_one_copy() -> None:
    for path in PATHS[:300]:
        two = set(rank(GWS, path)[:2])
        for lost in two:  # without the lost one, the other replica is first
            rest = [u for i, u in enumerate(GWS) if i != lost]
            survivor = GWS[(two - {lost}).pop()]
            assert survivor in {rest[i] for i in rank(rest, path)[:2]}


# -- configuration -----------------------------------------------------------------------


def test_a_list_of_urls_and_replicas() -> None:
    c = load_config({"ORCHESTRATOR_PUSH_URL": " http://a:9091, https://b:9091/ ",
                     "ORCHESTRATOR_PUSH_REPLICAS": "2"})
    assert c.urls == ("http://a:9091", "https://b:9091") and c.replicas == 2


@pytest.mark.parametrize(("env", "message"), [
    ({"ORCHESTRATOR_PUSH_URL": "http://a:1,,http://b:1"},
     "ORCHESTRATOR_PUSH_URL: an empty item in the list of URLs"),
    ({"ORCHESTRATOR_PUSH_URL": "http://a:1,http://a:1"},
     "ORCHESTRATOR_PUSH_URL: a gateway is listed twice"),
    ({"ORCHESTRATOR_PUSH_URL": "http://a:1,ftp://b:1"},
     "ORCHESTRATOR_PUSH_URL: expected http://host:port or https://host:port"),
    ({"ORCHESTRATOR_PUSH_URL": "http://a:1,http://b:1", "ORCHESTRATOR_PUSH_REPLICAS": "3"},
     "ORCHESTRATOR_PUSH_REPLICAS: must be a whole number from 1 to the number of gateways (2)"),
    ({"ORCHESTRATOR_PUSH_REPLICAS": "0"}, "ORCHESTRATOR_PUSH_REPLICAS: must be greater than 0"),
    ({"ORCHESTRATOR_PUSH_REPLICAS": "1.5"}, "ORCHESTRATOR_PUSH_REPLICAS: expected a positive"),
])
def test_bad_lists_fail_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert str(err.value).startswith(message)


def test_different_credentials_in_the_urls_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"ORCHESTRATOR_PUSH_URL": "http://u:s3cret@a:1,http://u:other@b:1"})
    assert "s3cret" not in str(err.value) and "other" not in str(err.value)
    c = load_config({"ORCHESTRATOR_PUSH_URL": "http://u:s3cret@a:1,http://b:1"})
    assert c.url == "http://a:1,http://b:1" and c.username == "u"
    assert c.password is not None and c.password.reveal() == "s3cret"
    assert "s3cret" not in repr(c)


# -- real gateways -----------------------------------------------------------------------

def spread(gws: list[Pushgateway], per: int = 3) -> list[str]:
    """Job names, ``per`` of them first on each gateway (the ports, and so the
    hashes, change from run to run)."""
    out: list[str] = []
    taken = [0] * len(gws)
    for i in range(10_000):
        first = expected(gws, f"job{i}", 1)[0]
        if taken[first] < per:
            taken[first] += 1
            out.append(f"job{i}")
        if len(out) == per * len(gws):
            return out
    raise AssertionError("no spread found")


def test_each_group_goes_to_the_gateway_its_hash_picks(three: list[Pushgateway]) -> None:
    JOBS = spread(three)
    for job in JOBS:
        assert exec_run(urls(three), job).returncode == 0
    for job in JOBS:
        assert holders(three, job) == expected(three, job, 1), job


def test_with_replicas_2_each_group_is_on_its_two_gateways(three: list[Pushgateway]) -> None:
    JOBS = spread(three, 2)
    for job in JOBS:
        assert exec_run(urls(three), job, replicas=2).returncode == 0
    for job in JOBS:
        assert holders(three, job) == expected(three, job, 2), job


def test_one_stopped_with_replicas_1_only_its_share_waits_and_doctor_says_which(
    three: list[Pushgateway], tmp_path: str
) -> None:
    JOBS = spread(three)
    three[1].stop()
    spool = str(tmp_path)
    env = {"ORCHESTRATOR_PUSH_SPOOL_DIR": spool, "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "1"}
    on_stopped = [j for j in JOBS if expected(three, j, 1) == [1]]
    assert len(on_stopped) == 3
    for job in JOBS:
        p = exec_run(urls(three), job, code=3, env=env)
        assert p.returncode == 3  # the command's own code, whatever the gateways do
    for job in JOBS:
        want = [] if job in on_stopped else expected(three, job, 1)
        assert holders([three[0], three[2]], job) == [0 if i == 0 else 1 for i in want]
    spooled = [n for n in os.listdir(spool) if n.endswith(".spool")]
    assert len(spooled) == len(on_stopped)  # nothing lost: the spool holds them

    out = io.StringIO()
    code = doctor.run(out, {"ORCHESTRATOR_PUSH_URL": urls(three),
                            "ORCHESTRATOR_PUSH_SPOOL_DIR": spool})
    text = out.getvalue()
    assert code == 1
    assert f"[FAIL] reach the gateway: {three[1].url}:" in text
    assert f"[  ok] reach the gateway: {three[0].url}: Pushgateway" in text
    assert (f"[FAIL] gateways: 3 gateways, each group on 1 of them (ORCHESTRATOR_PUSH_REPLICAS): "
            f"{three[1].url} failing; the groups all of whose replicas are among them "
            "(about 33%) are stale at Prometheus until one is back") in text

    # back (a fresh gateway on the same port): the spool delivers the rest
    back = start(port=three[1].port)
    three[1] = back
    out = io.StringIO()
    assert admin.replay(load_config({"ORCHESTRATOR_PUSH_URL": urls(three)}, spool_dir=spool),
                        out) == 0
    for job in on_stopped:
        g = back.group(job=job, flow=job, task="main")
        assert g.value(f"{NS}_task_last_exit_code") == 3


def test_status_gc_and_delete_work_across_gateways(
    three: list[Pushgateway], capsys: pytest.CaptureFixture[str]
) -> None:
    JOBS = spread(three, 2)
    for job in JOBS:
        assert exec_run(urls(three), job).returncode == 0
    # A copy left behind where the group no longer hashes to (the list changed).
    first = JOBS[0]
    stray = next(i for i in range(3) if i != expected(three, first, 1)[0])
    assert exec_run(three[stray].url, first, code=1).returncode == 1
    config = load_config({"ORCHESTRATOR_PUSH_URL": urls(three)})

    out = io.StringIO()
    assert admin.status(config, out, as_json=True) == 0
    rows = [r for r in json.loads(out.getvalue()) if r["kind"] == "task"]
    assert sorted(r["job"] for r in rows) == sorted(JOBS)  # one row per group
    # of the two copies of job0, the one pushed last (the stray failure)
    assert next(r for r in rows if r["job"] == first)["status"] == "failed"

    out = io.StringIO()
    assert admin.delete(config, out, labels={"job": first, "flow": first, "task": "main"}) == 0
    assert holders(three, first) == []  # both copies

    held = len(three[0].groups()) + len(three[1].groups())
    three[2].stop()
    out = io.StringIO()
    assert admin.gc(config, out, older_than=1.0, now=time.time() + 60) == 1
    err = capsys.readouterr().err
    assert f"cannot read the Pushgateway at {three[2].url}" in err
    assert three[0].groups() == [] and three[1].groups() == []  # each gateway's own
    assert out.getvalue().count("deleted ") == held


def test_replicas_2_one_stopped_mid_run_nothing_missing_and_it_catches_up(
    three: list[Pushgateway]
) -> None:
    """A long-lived process (a Celery node, a scheduler) with replicas=2: one
    gateway stops while it records; every group stays whole on another, and
    the stopped one gets what it missed once it is back."""
    e = op.Engine(load_config({}, url=urls(three), replicas=2, interval=0.05))
    try:
        flows = [f"f{i}" for i in range(12)]
        paths = {f: schema.group_path((("job", "celery"), ("flow", f), ("task", "t")))
                 for f in flows}
        end = 1_700_000_000.0

        def record(n: int) -> None:
            for f in flows:
                e.record_task(TaskRecord("celery", f, "t", "success", end + n, 1.0, 1))
            assert e.flush(10)

        def completion(gw: Pushgateway, f: str) -> float | None:
            for g in gw.groups():
                if g.labels.get("flow") == f:
                    return g.value(f"{NS}_task_last_completion_timestamp_seconds")
            return None

        record(1)
        port = three[1].port
        three[1].stop()
        record(2)
        record(3)
        live = [three[0], three[2]]
        for f in flows:  # every group's newest value is on a live gateway
            assert max(completion(gw, f) or 0 for gw in live) == end + 3, f
        assert sum(e.stats().lost.values()) == 0 and e.stats().spooled == 0

        three[1] = start(port=port)  # back, empty (no persistence)
        mine = [f for f in flows if 1 in rank([gw.url for gw in three], paths[f])[:2]]
        assert mine
        wait_until(lambda: all(completion(three[1], f) == end + 3 for f in mine), 40,
                   what="the restarted gateway caught up")
        for f in flows:
            if f not in mine:
                assert completion(three[1], f) is None
    finally:
        e.close(5)
