"""Celery beat pushes when each periodic entry is next due: a real `celery beat`
process, its own schedule file compared with what reached the gateway."""

from __future__ import annotations

import os
import shelve
import signal
import subprocess
import sys

from gateway import Pushgateway, wait_until

HERE = os.path.dirname(__file__)
NS = "orchestrator"


def start_beat(module: str, pushgateway: Pushgateway, redis_url: str, schedule_file: str,
               log: str, **env: str) -> subprocess.Popen[bytes]:
    """A real `celery -A module beat` ticking at least every second, its output in ``log``."""
    full = {**os.environ, "TEST_REDIS_URL": redis_url, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
            "ORCHESTRATOR_PUSH_INTERVAL": "0.2",
            "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", module, "beat", "-l", "info",
             "-s", schedule_file, "--max-interval", "1"],
            env=full, cwd=HERE, stdout=out, stderr=subprocess.STDOUT)


def test_beat_pushes_each_entrys_next_due_time_as_its_schedule_file_says(
    pushgateway: Pushgateway, redis_url: str, tmp_path: object
) -> None:
    schedule_file = os.path.join(str(tmp_path), "beat-schedule")
    log = os.path.join(str(tmp_path), "beat.log")
    beat = start_beat("beatapp", pushgateway, redis_url, schedule_file, log,
                      ORCHESTRATOR_PUSH_SCHEDULE_GRACE="5s")

    def output() -> str:
        with open(log, errors="replace") as f:
            return f.read()

    try:
        # the 3 s entry sent twice, and its due time pushed after that
        wait_until(lambda: output().count("Sending due task ping-every-3s") >= 2
                   or beat.poll() is not None, 30, what="beat to send ping-every-3s twice")
        assert beat.poll() is None, output()[-3000:]

        def pushed() -> dict[str, float]:
            try:
                g = pushgateway.group(job="celery", flow="shop", task="shop.ok")
            except KeyError:
                return {}
            return {lab["schedule"]: v
                    for lab, v in g.metrics.get(f"{NS}_task_next_run_timestamp_seconds", [])}

        wait_until(lambda: len(pushed()) == 2, 10, what="both entries of shop.ok at the gateway")
        # Stop it just after a send, when its due time is pushed and the next
        # tick is ~3 s away: a SIGTERM in the middle of a tick can leave beat's
        # file a tick behind what it did (seen once with Celery 5.4).
        before, sent = pushed()["ping-every-3s"], output().count("Sending due task ping-every-3s")
        wait_until(lambda: output().count("Sending due task ping-every-3s") > sent
                   and pushed()["ping-every-3s"] > before, 10, interval=0.05,
                   what="the next send of ping-every-3s and its new due time")
    finally:
        if beat.poll() is None:
            beat.send_signal(signal.SIGTERM)  # beat writes its schedule file, we flush at exit
        assert beat.wait(30) == 0, output()[-3000:]

    with shelve.open(schedule_file, flag="r") as db:
        last = {name: e.last_run_at.timestamp() for name, e in db["entries"].items()}
    ok = pushgateway.group(job="celery", flow="shop", task="shop.ok")
    due = {lab["schedule"]: v for lab, v in ok.metrics[f"{NS}_task_next_run_timestamp_seconds"]}
    assert abs(due["ping-every-3s"] - (last["ping-every-3s"] + 3)) <= 0.02
    assert abs(due["ping-hourly"] - (last["ping-hourly"] + 3600)) <= 0.02
    assert ok.value(f"{NS}_task_schedule_grace_seconds", schedule="ping-hourly") == 5
    assert ok.value(f"{NS}_push_group_ttl_seconds") == 7 * 86400  # 3 hours are less than a week
    fail = pushgateway.group(job="celery", flow="shop", task="shop.fail")
    cron_due = fail.value(f"{NS}_task_next_run_timestamp_seconds", schedule="fail-every-5m",
                          framework="celery")
    assert abs(cron_due - (last["fail-every-5m"] // 300 + 1) * 300) <= 0.02
    assert "orchestrator_push" not in output()


def test_beat_stopped_in_the_middle_of_a_tick_pushes_the_due_time_of_what_it_sent(
    pushgateway: Pushgateway, redis_url: str, tmp_path: object
) -> None:
    """SIGTERM arrives as beat publishes (beat's handler raises SystemExit there):
    the due time that follows the send is delivered, not the one the send met, which
    the worker's start would satisfy and no missed-run alert would ever fire."""
    schedule_file = os.path.join(str(tmp_path), "beat-schedule")
    sent_file = os.path.join(str(tmp_path), "sent")
    log = os.path.join(str(tmp_path), "beat.log")
    beat = start_beat("beatapp_stop_on_send", pushgateway, redis_url, schedule_file, log,
                      TEST_SENT_FILE=sent_file)
    try:
        code = beat.wait(30)  # it stops itself on its second send, ~3 s in
    finally:
        if beat.poll() is None:
            beat.kill()
            beat.wait()
    with open(log, errors="replace") as f:
        output = f.read()
    assert code == 0, output[-3000:]
    with open(sent_file) as f:
        sent = float(f.read())
    with shelve.open(schedule_file, flag="r") as db:
        last = db["entries"]["ping-every-3s"].last_run_at.timestamp()
    ok = pushgateway.group(job="celery", flow="shop", task="shop.ok")
    due = ok.value(f"{NS}_task_next_run_timestamp_seconds", schedule="ping-every-3s")
    # beat's own record: the send it was stopped in is its last run
    assert last <= sent <= last + 1
    assert abs(due - (last + 3)) <= 0.02
    assert "orchestrator_push" not in output
