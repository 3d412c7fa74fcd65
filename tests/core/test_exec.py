"""`orchestrator-push exec` as a user runs it: a real subprocess, a real gateway."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from gateway import Pushgateway, free_port, wait_until
from proxy import Proxy

NS = "orchestrator"


def cli() -> list[str]:
    found = shutil.which("orchestrator-push", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "orchestrator_push"]


def run(args: list[str], url: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": url, **kw.pop("env", {})}  # type: ignore[dict-item]
    return subprocess.run([*cli(), *args], env=env, capture_output=True, text=True,
                          timeout=60, **kw)  # type: ignore[call-overload]


def test_success_pushes_every_series_and_exits_0(pushgateway: Pushgateway) -> None:
    before = time.time()
    p = run(["exec", "--job", "backup", "--", "sh", "-c", "echo hello; echo oops >&2"],
            pushgateway.url)
    assert p.returncode == 0
    assert p.stdout == "hello\n" and p.stderr == "oops\n"  # streamed through, nothing added
    g = pushgateway.group(job="backup", flow="backup", task="main")
    assert g.value(f"{NS}_task_last_status", framework="exec", status="success") == 1
    assert g.value(f"{NS}_task_last_status", status="failed") == 0
    assert g.value(f"{NS}_task_last_exit_code") == 0
    assert g.value(f"{NS}_task_last_attempt") == 1
    assert 0 <= g.value(f"{NS}_task_last_duration_seconds") < 30
    done = g.value(f"{NS}_task_last_completion_timestamp_seconds")
    assert before <= done <= time.time()
    assert g.value(f"{NS}_task_last_success_timestamp_seconds") == done


def test_failure_keeps_the_exit_code_and_flow_task_options(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "etl", "--flow", "sales", "--task", "load", "--",
             sys.executable, "-c", "import sys; sys.exit(3)"], pushgateway.url)
    assert p.returncode == 3
    g = pushgateway.group(job="etl", flow="sales", task="load")
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert g.value(f"{NS}_task_last_exit_code") == 3
    assert f"{NS}_task_last_failure_timestamp_seconds" in g.metrics


def test_killed_by_signal_exits_128_plus_n(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "j", "--", "sh", "-c", "kill -TERM $$"], pushgateway.url)
    assert p.returncode == 128 + signal.SIGTERM
    g = pushgateway.group(job="j", flow="j", task="main")
    assert g.value(f"{NS}_task_last_exit_code") == 143


def test_command_not_found_exits_127_and_is_reported(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "j", "--", "/no/such/command-xyz"], pushgateway.url)
    assert p.returncode == 127
    assert "cannot start '/no/such/command-xyz'" in p.stderr
    g = pushgateway.group(job="j", flow="j", task="main")
    assert g.value(f"{NS}_task_last_exit_code") == 127
    assert g.value(f"{NS}_task_last_status", status="failed") == 1


def test_stdin_is_inherited(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "j", "--", "cat"], pushgateway.url, input="piped in\n")
    assert p.returncode == 0 and p.stdout == "piped in\n"


def test_sigterm_is_forwarded_to_the_command(pushgateway: Pushgateway) -> None:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url}
    script = "import signal,sys,time\n" \
             "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), sys.exit(7)))\n" \
             "print('ready', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([*cli(), "exec", "--job", "sig", "--", sys.executable, "-c", script],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 7
        assert proc.stdout.read() == "got TERM\n"
    finally:
        if proc.poll() is None:
            proc.kill()
    g = pushgateway.group(job="sig", flow="sig", task="main")
    assert g.value(f"{NS}_task_last_exit_code") == 7


def test_gateway_down_exits_promptly_with_the_commands_code() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    p = run(["exec", "--job", "j", "--", "sh", "-c", "exit 5"], url,
            env={"ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "1", "ORCHESTRATOR_PUSH_TIMEOUT": "1"})
    elapsed = time.monotonic() - started
    assert p.returncode == 5
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "not delivered" in lines[0] and "exit code 5 kept" in lines[0]
    assert "spooled to" in lines[0]
    assert elapsed < 20  # bounded by the 1 s flush timeout plus interpreter start-up


def test_invalid_configuration_names_the_variable(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "j", "--", "true"], pushgateway.url,
            env={"ORCHESTRATOR_PUSH_LABELS": "job=x"})
    assert p.returncode == 2
    assert "ORCHESTRATOR_PUSH_LABELS" in p.stderr and "reserved" in p.stderr
    assert pushgateway.groups() == []


def test_disabled_runs_the_command_and_pushes_nothing(pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "j", "--", "sh", "-c", "exit 4"], pushgateway.url,
            env={"ORCHESTRATOR_PUSH_ENABLED": "false"})
    assert p.returncode == 4 and p.stderr == ""
    assert pushgateway.groups() == []


@pytest.mark.parametrize("args", [["exec", "--job", "j"], ["exec", "--", "true"], []])
def test_usage_errors(args: list[str]) -> None:
    p = run(args, "http://127.0.0.1:1")
    assert p.returncode == 2 and "usage:" in p.stderr


def test_help_shows_examples() -> None:
    p = run(["exec", "--help"], "http://127.0.0.1:1")
    assert p.returncode == 0 and "orchestrator-push exec --job nightly-backup" in p.stdout


@pytest.mark.parametrize("args", [["exec", "--help"], ["status", "--help"], ["exec"]])
def test_help_and_errors_fit_the_terminal(args: list[str]) -> None:
    widths = {}
    for columns in (60, 200):
        p = run(args, "http://127.0.0.1:1", env={"COLUMNS": str(columns)})
        out = p.stdout or p.stderr
        assert out.startswith("usage: orchestrator-push"), out
        lines = out.splitlines()
        usage = [lines[0], *itertools.takewhile(lambda line: line.startswith(" "), lines[1:])]
        widths[columns] = max(len(line) for line in usage)
    assert widths[60] < 78 < widths[200] <= 200, widths  # not the 80 columns it was built with


def test_delivery_happens_before_exit(pushgateway: Pushgateway) -> None:
    # The group is there the moment exec returns: no wait, no poll.
    p = run(["exec", "--job", "immediate", "--", "true"], pushgateway.url,
            env={"ORCHESTRATOR_PUSH_INTERVAL": "3600"})
    assert p.returncode == 0
    assert pushgateway.group(job="immediate", flow="immediate", task="main")


def test_the_start_is_at_the_gateway_while_the_command_runs(pushgateway: Pushgateway) -> None:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "ORCHESTRATOR_PUSH_INTERVAL": "0.2"}
    script = "import sys; print('ready', flush=True); sys.stdin.readline()"
    before = time.time()
    proc = subprocess.Popen([*cli(), "exec", "--job", "long", "--timeout", "1h", "--",
                             sys.executable, "-c", script],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"

        def started() -> float | None:
            try:
                g = pushgateway.group(job="long", flow="long", task="main")
                return g.value(f"{NS}_task_last_start_timestamp_seconds")
            except KeyError:
                return None

        start = wait_until(started, 10, what="the start, while the command runs")
        assert before <= start <= time.time()
        # pushed by exec's own thread, the only one: one record needs no other
        assert os.listdir(f"/proc/{proc.pid}/task") == [str(proc.pid)]
        g = pushgateway.group(job="long", flow="long", task="main")
        assert g.value(f"{NS}_task_timeout_seconds") == 3600
        assert f"{NS}_task_last_completion_timestamp_seconds" not in g.metrics
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    g = pushgateway.group(job="long", flow="long", task="main")
    assert g.value(f"{NS}_task_last_start_timestamp_seconds") == start
    assert g.value(f"{NS}_task_last_completion_timestamp_seconds") > start


def test_earlier_runs_spool_is_replayed_while_the_command_runs(
        pushgateway: Pushgateway, tmp_path: object) -> None:
    spool = str(tmp_path)
    env = {"ORCHESTRATOR_PUSH_SPOOL_DIR": spool, "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "0.5",
           "ORCHESTRATOR_PUSH_TIMEOUT": "0.5"}
    down = run(["exec", "--job", "earlier", "--", "sh", "-c", "exit 3"],
               f"http://127.0.0.1:{free_port()}", env=env)
    assert down.returncode == 3 and "spooled to" in down.stderr, down.stderr
    proc = subprocess.Popen([*cli(), "exec", "--job", "later", "--", "cat"],
                            env={**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url, **env},
                            stdin=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None

        def replayed() -> float | None:
            try:
                g = pushgateway.group(job="earlier", flow="earlier", task="main")
            except KeyError:
                return None
            return g.value(f"{NS}_task_last_exit_code")

        assert wait_until(replayed, 10, what="the earlier run, replayed") == 3
        assert proc.poll() is None  # while the command runs, not at its end
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert pushgateway.group(job="later", flow="later", task="main")


def test_a_push_in_progress_when_the_command_ends_is_not_in_its_duration(
        pushgateway: Pushgateway, proxy: Proxy) -> None:
    # exec pushes on the thread that waits for the command: the start's push,
    # answered 2 s late, is in progress when the command ends at 0.5 s
    proxy.delay = 2.0
    p = run(["exec", "--job", "timed", "--", "sleep", "0.5"], proxy.url,
            env={"ORCHESTRATOR_PUSH_INTERVAL": "0.1", "ORCHESTRATOR_PUSH_TIMEOUT": "5",
                 "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "20"})
    assert p.returncode == 0, p.stderr
    assert proxy.requests >= 2  # the start, then the end: the start was on its own
    g = pushgateway.group(job="timed", flow="timed", task="main")
    assert 0.5 <= g.value(f"{NS}_task_last_duration_seconds") < 2.0


def test_timeout_stops_the_command_during_a_push_that_hangs(
        pushgateway: Pushgateway, proxy: Proxy) -> None:
    proxy.hold.set()  # the start's push gets no answer until the test says so
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": proxy.url, "ORCHESTRATOR_PUSH_INTERVAL": "0.1",
           "ORCHESTRATOR_PUSH_TIMEOUT": "30", "ORCHESTRATOR_PUSH_FLUSH_TIMEOUT": "30"}
    proc = subprocess.Popen([*cli(), "exec", "--job", "hung", "--timeout", "1s", "--",
                             "sleep", "30"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert "(--timeout); stopping it" in proc.stderr.readline()
        assert proxy.held == 1  # SIGTERM went while exec was in the push
        proxy.hold.clear()
        assert proc.wait(60) == 124
    finally:
        proxy.hold.clear()
        if proc.poll() is None:
            proc.kill()
    g = pushgateway.group(job="hung", flow="hung", task="main")
    assert g.value(f"{NS}_task_last_exit_code") == 124
    assert 1.0 <= g.value(f"{NS}_task_last_duration_seconds") < 30


def test_a_killed_exec_leaves_its_start_without_a_completion(pushgateway: Pushgateway) -> None:
    env = {**os.environ, "ORCHESTRATOR_PUSH_URL": pushgateway.url,
           "ORCHESTRATOR_PUSH_INTERVAL": "0.2"}
    proc = subprocess.Popen([*cli(), "exec", "--job", "vanished", "--", "sleep", "60"], env=env,
                            start_new_session=True)
    try:
        wait_until(lambda: any(g.labels.get("job") == "vanished"
                               and f"{NS}_task_last_start_timestamp_seconds" in g.metrics
                               for g in pushgateway.groups()), 10, what="the start")
        os.killpg(proc.pid, signal.SIGKILL)  # exec and its command, as an OOM kill or a reboot
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    g = pushgateway.group(job="vanished", flow="vanished", task="main")
    assert f"{NS}_task_last_completion_timestamp_seconds" not in g.metrics  # what the rule reads


def test_timeout_stops_the_command_exits_124_and_pushes_a_failure(
        pushgateway: Pushgateway) -> None:
    p = run(["exec", "--job", "slow", "--timeout", "1s", "--", "sleep", "30"], pushgateway.url)
    assert p.returncode == 124, p.stderr
    assert "--timeout" in p.stderr
    g = pushgateway.group(job="slow", flow="slow", task="main")
    assert g.value(f"{NS}_task_last_exit_code") == 124
    assert g.value(f"{NS}_task_last_status", status="failed") == 1
    assert g.value(f"{NS}_task_timeout_seconds") == 1
    assert 1.0 <= g.value(f"{NS}_task_last_duration_seconds") < 30  # stopped, not run out
