"""`orchestrator-push exec -- true` against a hand-written prometheus_client push
script that runs the same command, whole processes, side by side.

A real Pushgateway on 127.0.0.1. Variants run interleaved, round after round
(this machine drifts 5-20 % within seconds); the table gives each variant's
median wall time and the median of the per-round ratios to the hand-written
script. Correct: the gateway holds what each variant pushed (exit code 0).

    python bench/bench_exec.py [--rounds 31] [--no-bytecode] [--before DIR] [--https]

``--before DIR`` adds the ``exec`` of another checkout (``git worktree add DIR
<commit>``), run with the same interpreter and packages: a change's effect,
side by side in one run. ``--https`` serves the gateway over TLS with a
private CA: the script trusts it through ``SSL_CERT_FILE`` (what its default
TLS context reads), ``exec`` through ``ORCHESTRATOR_PUSH_CA_BUNDLE``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from gateway import start
from tls import make_certs, web_config

#: What a user writes without this library: run the command, push its outcome.
HAND_WRITTEN = """\
import subprocess, sys, time
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
t0 = time.time()
code = subprocess.call(sys.argv[2:])
r = CollectorRegistry()
Gauge("hand_last_duration_seconds", "Duration.", registry=r).set(time.time() - t0)
Gauge("hand_last_exit_code", "Exit code.", registry=r).set(code)
Gauge("hand_last_completion_timestamp_seconds", "End.", registry=r).set(time.time())
push_to_gateway(sys.argv[1], job="hand", registry=r)
sys.exit(code)
"""


def cli() -> list[str]:
    found = shutil.which("orchestrator-push", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "orchestrator_push"]


def console_script(checkout: str) -> list[str]:
    """What pip's console script for that checkout runs: its entry point, called."""
    with open(os.path.join(checkout, "pyproject.toml")) as f:
        entry = re.search(r'^orchestrator-push = "([\w.]+):(\w+)"', f.read(), re.M)
    assert entry, f"no orchestrator-push script in {checkout}/pyproject.toml"
    module, func = entry.groups()
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def exec_args(job: str) -> list[str]:
    return ["exec", "--job", job, "--", "true"]


def timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    # "/" as the working directory: `-c` puts it first on sys.path, and a
    # checkout there would shadow the one on PYTHONPATH
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, cwd="/")
    return time.perf_counter() - t0


Variant = tuple[list[str], dict[str, str]]


def interleaved(variants: dict[str, Variant], rounds: int) -> dict[str, list[float]]:
    """Each variant's wall times, the order reversed every other round, after
    one warm-up run each (the page cache and the .pyc files)."""
    for args, env in variants.values():
        timed(args, env)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(rounds):
        for name in list(variants) if i % 2 == 0 else reversed(list(variants)):
            times[name].append(timed(*variants[name]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--before", metavar="DIR",
                    help="another checkout of the project: its exec as a third variant")
    ap.add_argument("--https", action="store_true",
                    help="the gateway over TLS, its certificate from a private CA")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="compile every module from source at every run (an install "
                         "without .pyc files, or PYTHONDONTWRITEBYTECODE set)")
    opts = ap.parse_args()
    rounds = opts.rounds
    work = tempfile.mkdtemp(prefix="op-bench-exec-")
    tls_env: dict[str, str] = {}
    if opts.https:
        certs = make_certs(work)
        gw = start(extra_args=[f"--web.config.file={web_config(work, certs)}"],
                   context=ssl.create_default_context(cafile=certs.ca))
        tls_env = {"SSL_CERT_FILE": certs.ca, "ORCHESTRATOR_PUSH_CA_BUNDLE": certs.ca}
    else:
        gw = start()
    try:
        script = os.path.join(work, "hand.py")
        with open(script, "w") as f:
            f.write(HAND_WRITTEN)
        env = {**os.environ, "ORCHESTRATOR_PUSH_URL": gw.url,
               "XDG_CACHE_HOME": os.path.join(work, "cache"), **tls_env}
        if opts.no_bytecode:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            # An installed package has its .pyc files (pip compiles them at
            # install): the warm-up writes them here, whatever the environment
            # says, for both variants alike.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
        variants: dict[str, Variant] = {
            "hand-written prometheus_client script": (
                [sys.executable, script, gw.url, "true"], env),
            "orchestrator-push exec": ([*cli(), *exec_args("bench")], env),
        }
        #: each variant's group and the exit code it pushed there
        pushed = {"hand-written prometheus_client script": ("hand", "hand_last_exit_code"),
                  "orchestrator-push exec": ("bench", "orchestrator_task_last_exit_code")}
        if opts.before:
            name = f"exec of {opts.before}"
            before = {**env, "PYTHONPATH": os.path.abspath(opts.before)}
            variants[name] = ([*console_script(opts.before), *exec_args("before")], before)
            pushed[name] = ("before", "orchestrator_task_last_exit_code")
        times = interleaved(variants, rounds)
        hand = times["hand-written prometheus_client script"]
        ratios = {name: [e / h for e, h in zip(ts, hand, strict=True)]
                  for name, ts in times.items()}
        groups = {g.labels.get("job"): g for g in gw.groups() if "instance" not in g.labels}
        correct = {name: job in groups and groups[job].value(metric) == 0
                   for name, (job, metric) in pushed.items()}
        print(f"{rounds} rounds, interleaved; Python {sys.version.split()[0]}; "
              f"{'no .pyc files' if opts.no_bytecode else '.pyc files'}; {gw.url}\n")
        print("| variant | wall ms (median) | p25-p75 | ratio to the script (median of per-round) | correct |")
        print("|---|---:|---:|---:|:-:|")
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=4)
            ratio = f"{statistics.median(ratios[name]):.2f}"
            print(f"| {name} | {statistics.median(ts) * 1000:.0f} | "
                  f"{q[0] * 1000:.0f}-{q[2] * 1000:.0f} | {ratio} | "
                  f"{'yes' if correct[name] else 'NO'} |")
        # where the time goes: start-ups that only import (the last three with
        # the collector off and frozen at exit, as the console script runs)
        quiet = "import gc; gc.disable(); "
        lightened = (quiet + "from orchestrator_push.console import lighten; "
                     "lighten('exec'); ")
        imports = {what: ([sys.executable, "-c", code], env) for what, code in (
            ("`python -c pass`", "pass"),
            ("`import prometheus_client` (the script's imports)", "import prometheus_client"),
            ("the same, collector off", quiet + "import prometheus_client; gc.freeze()"),
            ("what a push needs of prometheus_client (no `__init__`, no HTTP server), "
             "collector off",
             lightened + "import http.client, prometheus_client.metrics_core; gc.freeze()"),
            ("what `exec` imports, collector off",
             lightened + "import orchestrator_push.cli; gc.freeze()"))}
        print("\n| start-up | ms (median) |\n|---|---:|")
        for name, ts in interleaved(imports, rounds).items():
            print(f"| {name} | {statistics.median(ts) * 1000:.0f} |")
    finally:
        gw.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
