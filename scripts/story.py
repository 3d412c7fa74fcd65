"""The whole story on one machine (`make demo`; the end-to-end test runs the same).

Starts a Pushgateway and a Prometheus (with deploy/prometheus/rules.yml) on
127.0.0.1, runs the Celery, Airflow and Prefect examples, each in its own
virtualenv under .envs/ (created with uv on first use), and two
`orchestrator-push exec` jobs, then prints `orchestrator-push status`, shows a
missed run raising OrchestratorTaskMissed (a loop scheduled every 2 s that ran
once), and prints the URLs to look at. On a terminal it keeps both servers up
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the 127.0.0.1 servers, shared with the tests

from gateway import Prometheus, Pushgateway, RedisServer, wait_until  # noqa: E402
from gateway import start as start_gateway  # noqa: E402

RULE_FILES = [
    os.path.join(ROOT, "deploy", "prometheus", f) for f in ("rules.yml", "thresholds.yml")
]
EXAMPLES = os.path.join(ROOT, "examples")

#: What each example's virtualenv holds: the versions the test sessions run.
FRAMEWORKS: dict[str, list[str]] = {
    "celery": [f"{ROOT}[celery]", "celery[redis]==5.7.*", "kombu==5.7.*"],
    "prefect": [f"{ROOT}[prefect]", "prefect==3.9.*"],
    "airflow": [ROOT, "apache-airflow==3.3.*", "apache-airflow-providers-standard"],
}

Say = Callable[[str], None]


def framework_python(name: str, say: Say = print) -> str:
    """The Python of ``.envs/<name>``, created (or refreshed) with uv when needed."""
    env_dir = os.path.join(ROOT, ".envs", name)
    python = os.path.join(env_dir, "bin", "python")
    wanted = "\n".join(FRAMEWORKS[name])
    marker = os.path.join(env_dir, ".requirements")
    if os.path.exists(python) and os.path.exists(marker):
        with open(marker) as f:
            if f.read() == wanted:
                return python
    say(f"installing {name} into .envs/{name} (uv, once)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(["uv", "venv", "-q", "--allow-existing", "-p", version, env_dir], check=True)
    editable = [
        a for req in FRAMEWORKS[name] for a in (["-e", req] if req.startswith(ROOT) else [req])
    ]
    subprocess.run(["uv", "pip", "install", "-q", "--python", python, *editable], check=True)
    with open(marker, "w") as f:
        f.write(wanted)
    return python


def _run(
    args: list[str], env: Mapping[str, str], what: str, timeout: float = 300, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        args, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    return p


#: Everything the story writes (spool, Airflow's and Prefect's homes), removed at its exit.
_WORK = tempfile.mkdtemp(prefix="orchestrator-push-story-")
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)
_SPOOL = tempfile.mkdtemp(prefix="spool-", dir=_WORK)


def _base_env(gateway: Pushgateway) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_PUSH_")}
    env["ORCHESTRATOR_PUSH_URL"] = gateway.url
    # its own spool: records other processes on this machine left in the default
    # one would be replayed into this gateway
    env["ORCHESTRATOR_PUSH_SPOOL_DIR"] = _SPOOL
    return env


def run_exec(gateway: Pushgateway, say: Say = print) -> None:
    env = _base_env(gateway)
    cli = [
        sys.executable,
        "-m",
        "orchestrator_push",
        "exec",
        "--job",
        "backup",
        "--flow",
        "nightly",
    ]
    say("exec: a backup that succeeds and an upload that fails (exit code 3)")
    _run([*cli, "--task", "dump", "--", "sh", "-c", "echo dumping; sleep 0.3"], env, "exec dump")
    p = subprocess.run(
        [*cli, "--task", "upload", "--", "sh", "-c", "exit 3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if p.returncode != 3:
        raise RuntimeError(f"exec upload: expected exit code 3, got {p.returncode}: {p.stderr}")


def show_missed_run(gateway: Pushgateway, prometheus: Prometheus, say: Say = print) -> None:
    """A scheduled loop that ran once and stopped: its next run is due 2 s after
    it ended, with 1 s of grace, and Prometheus fires OrchestratorTaskMissed."""
    say("exec --every 2s --grace 1s: a loop that ran once and stopped; its next run is missed")
    cli = [sys.executable, "-m", "orchestrator_push", "exec", "--job", "heartbeat"]
    _run([*cli, "--every", "2s", "--grace", "1s", "--", "true"], _base_env(gateway), "heartbeat")

    def firing() -> bool:
        query = 'ALERTS{alertname="OrchestratorTaskMissed",alertstate="firing",job="heartbeat"}'
        return bool(prometheus.query(query))

    wait_until(firing, timeout=60, interval=0.5, what="OrchestratorTaskMissed for heartbeat")
    say("OrchestratorTaskMissed is firing for job heartbeat (Prometheus /alerts)")


def run_celery(gateway: Pushgateway, say: Say = print) -> None:
    python = framework_python("celery", say)
    redis = RedisServer()
    env = {**_base_env(gateway), "REDIS_URL": redis.url}
    cwd = os.path.join(EXAMPLES, "celery")
    say("celery: a prefork worker on a real Redis runs 21 tasks (retries and a failure among them)")
    worker = subprocess.Popen(
        [
            python,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "--pool",
            "prefork",
            "-c",
            "2",
            "-l",
            "warning",
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _run([python, "send.py"], env, "celery send.py", cwd=cwd, timeout=60)

        def all_reported() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"celery worker exited with {worker.returncode}")
            return (
                gateway.runs_by_status("shop.charge").get("success") == 10
                and gateway.runs_by_status("shop.ship").get("success") == 10
                and gateway.runs_by_status("shop.refund").get("failed") == 1
            )

        wait_until(all_reported, timeout=120, interval=0.2, what="the Celery worker's pushes")
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: it delivers, then exits
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        redis.stop()


def run_airflow(gateway: Pushgateway, say: Say = print) -> None:
    python = framework_python("airflow", say)
    home = tempfile.mkdtemp(prefix="airflow-", dir=_WORK)
    bindir = os.path.dirname(python)
    env = {
        **_base_env(gateway),
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(EXAMPLES, "airflow"),
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }
    say(
        "airflow: `airflow db migrate`, then dag.test() of example_etl "
        "(extract retried once, report fails)"
    )
    _run([os.path.join(bindir, "airflow"), "db", "migrate"], env, "airflow db migrate")
    _run([python, os.path.join(EXAMPLES, "airflow", "example_dag.py")], env, "example_dag.py")


def run_prefect(gateway: Pushgateway, say: Say = print) -> None:
    python = framework_python("prefect", say)
    env = {
        **_base_env(gateway),
        "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-", dir=_WORK),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    say("prefect: the daily-etl flow on Prefect's ephemeral server (extract retried once)")
    _run([python, os.path.join(EXAMPLES, "prefect", "etl_flow.py")], env, "etl_flow.py")


STEPS = (run_exec, run_celery, run_airflow, run_prefect)


def run_examples(gateway: Pushgateway, say: Say = print) -> None:
    for step in STEPS:
        step(gateway, say)


def scraped(prometheus: Prometheus) -> bool:
    """Prometheus holds every framework's last-run series."""
    found = {
        r["metric"].get("framework")
        for r in prometheus.query("count by (framework) (orchestrator_task_last_status)")
    }
    return found >= {"exec", "celery", "airflow", "prefect"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=sys.stdin.isatty(),
        help="keep the Pushgateway and Prometheus up until Ctrl-C (default: on a terminal)",
    )
    args = parser.parse_args()

    def say(text: str) -> None:
        print(f"== {text}", flush=True)

    gateway = start_gateway()
    prometheus = Prometheus(gateway.url, RULE_FILES)
    try:
        say(f"Pushgateway {gateway.url}, Prometheus {prometheus.url} (scraping it every second)")
        run_examples(gateway, say)
        wait_until(lambda: scraped(prometheus), timeout=60, interval=0.5, what="the scrape")
        say("orchestrator-push status")
        from orchestrator_push import admin, load_config

        admin.status(load_config({}, url=gateway.url), sys.stdout)
        show_missed_run(gateway, prometheus, say)
        say(
            f"Prometheus: {prometheus.url}/alerts (rules from deploy/prometheus), "
            f"{prometheus.url}/graph?g0.expr=orchestrator_task_last_status%3D%3D1"
        )
        say(f"Pushgateway: {gateway.url}")
        say("Grafana: import deploy/grafana/orchestrator-push.json with this Prometheus as source")
        if args.keep:
            say("Ctrl-C stops both servers")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        prometheus.stop()
        gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
