from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from gateway import RedisServer, wait_until

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis broker on a free 127.0.0.1 port, no persistence."""
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server.url
    finally:
        gc.collect()
        server.stop()


@pytest.fixture
def app(redis_url: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    import celeryapp

    celeryapp.app.conf.broker_url = redis_url
    celeryapp.app.conf.result_backend = redis_url
    yield celeryapp
    # AsyncResult.__del__ talks to Redis (Celery 5.4 retries forever when it is
    # gone): let the test's results go while the broker still runs.
    gc.collect()


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], log: str) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def pool(self) -> set[int]:
        """The pids of the worker's pool processes (its main process's children)."""
        pids: set[int] = set()
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Warm shutdown (SIGTERM) by default; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("worker did not stop in time:\n" + self.output()[-3000:]) from None


@pytest.fixture
def start_worker(redis_url: str, tmp_path: object) -> Iterator[object]:
    """Start real `celery worker` processes; they are stopped after the test."""
    workers: list[Worker] = []

    def start(gateway_url: str, *args: str, name: str = "w1", env: dict[str, str] | None = None) -> Worker:
        log = os.path.join(str(tmp_path), f"{name}.log")
        full_env = {**os.environ, "TEST_REDIS_URL": redis_url,
                    "ORCHESTRATOR_PUSH_URL": gateway_url,
                    "ORCHESTRATOR_PUSH_INTERVAL": "0.2",
                    "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {})}
        cmd = [sys.executable, "-m", "celery", "-A", "celeryapp", "worker", "-l", "info",
               "-n", f"{name}@%h", "--without-heartbeat", "--without-gossip", "--without-mingle",
               *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=full_env, cwd=HERE, stdout=out, stderr=subprocess.STDOUT)
        w = Worker(proc, log)
        workers.append(w)
        wait_until(lambda: "ready." in w.output() or proc.poll() is not None, 60, what="worker ready")
        assert proc.poll() is None, w.output()[-3000:]
        return w

    yield start
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)
