"""The console script's process: what it imports and collects around `main()`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import Pushgateway

from orchestrator_push.console import SERVER_SIDE, defer_init, import_without

NS = "orchestrator"


def test_the_console_script_collects_garbage_while_the_command_runs() -> None:
    # The collector is off while the imports run and their objects are frozen
    # at exit; between the two, an `exec` of a command that runs for hours
    # must collect what it makes, and not walk what the imports made.
    probe = ("import gc, orchestrator_push.cli as cli, orchestrator_push.console as console\n"
             "cli.main = lambda: print(gc.isenabled(), gc.get_freeze_count() > 1000) or 7\n"
             "console.run()\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (7, "True True\n", "")


#: What one `exec` of a command without a schedule has no use for: the whole
#: of prometheus_client (its __init__: every metric type and collector, about
#: 10 ms of imports), the HTTP server and push functions of its exposition
#: (about 9 ms), logging when nothing is logged (about 4 ms), schedules and
#: time zones, the operator's commands, reading groups.
NOT_FOR_ONE_RECORD = ("prometheus_client.metrics", "prometheus_client.process_collector",
                      *SERVER_SIDE, "logging", "orchestrator_push.schedules", "zoneinfo",
                      "cronsim", "orchestrator_push.admin", "orchestrator_push.doctor",
                      "orchestrator_push.groups", "orchestrator_push.gateways",
                      "shutil")


#: inspect is deferred, not left out: what its code imports says whether it ran.
INSPECT_RAN = ("ast",) if sys.version_info < (3, 12) else ()


def test_exec_imports_only_what_one_record_needs(pushgateway: Pushgateway) -> None:
    unused = (*NOT_FOR_ONE_RECORD, *INSPECT_RAN)
    probe = textwrap.dedent(f"""\
        import atexit, sys
        atexit.register(lambda: print([m for m in {unused!r} if m in sys.modules],
                                      "prometheus_client.exposition" in sys.modules))
        sys.argv = ["orchestrator-push", "exec", "--job", "deferred", "--", "true"]
        from orchestrator_push.console import run
        run()
        """)
    # stdout buffered, as a pipe's is: exec's fast exit still flushes what
    # its exit handlers (here the probe's) print
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
           "ORCHESTRATOR_PUSH_URL": pushgateway.url}
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert (p.returncode, p.stdout, p.stderr) == (0, "[] True\n", "")
    g = pushgateway.group(job="deferred", flow="deferred", task="main")
    assert g.value(f"{NS}_task_last_status", framework="exec", status="success") == 1


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package whose __init__ counts its runs in `sys.deferred_runs`."""
    name = f"deferred_{tmp_path.name.replace('-', '_')}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(
        "import sys\nsys.deferred_runs.append(1)\nfrom .part import VALUE\nNAME = 'init'\n")
    (tmp_path / name / "part.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "deferred_runs", [], raising=False)
    yield name
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[m]


def runs() -> int:
    return len(sys.deferred_runs)  # type: ignore[attr-defined]


def test_deferred_init_runs_at_the_first_name_only_the_init_defines(package: str) -> None:
    defer_init(package)
    part = __import__(f"{package}.part", fromlist=["VALUE"])
    assert (part.VALUE, runs()) == (42, 0)  # a submodule: no __init__
    pkg = sys.modules[package]
    assert (pkg.NAME, runs()) == ("init", 1)
    assert (pkg.NAME, runs()) == ("init", 1)  # once
    assert "__getattr__" not in vars(pkg)  # the package's own lookup from then on
    with pytest.raises(AttributeError):
        pkg.missing  # noqa: B018


def test_a_plain_module_is_deferred_alike(package: str, tmp_path: Path) -> None:
    # exec defers inspect so (Python 3.10/3.11): dataclasses imports it, and
    # uses it only for a class without a docstring.
    (tmp_path / f"{package}_plain.py").write_text(
        "import sys\nsys.deferred_runs.append('plain')\nNAME = 'plain'\n")
    defer_init(f"{package}_plain")
    try:
        mod = __import__(f"{package}_plain")  # an import statement: nothing runs
        assert runs() == 0
        assert (mod.NAME, mod.NAME, runs()) == ("plain", "plain", 1)
    finally:
        sys.modules.pop(f"{package}_plain", None)


def test_a_package_already_imported_is_left_alone(package: str) -> None:
    first = __import__(package)
    defer_init(package)
    assert sys.modules[package] is first and runs() == 1


def test_a_failing_init_raises_and_leaves_no_package(package: str, tmp_path: Path) -> None:
    (tmp_path / package / "__init__.py").write_text("raise ValueError('broken')\n")
    defer_init(package)
    pkg = sys.modules[package]
    with pytest.raises(ValueError, match="broken"):
        pkg.NAME  # noqa: B018
    assert package not in sys.modules  # as after a failed import


def test_another_thread_waits_for_the_init_rather_than_miss_a_name(
        package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The __init__ starts a thread that asks for a name the __init__ sets
    # later: that thread must get it, not an AttributeError from a package
    # half run. While it waits, the __init__ itself sees its names as a
    # package being imported does (not yet set: missing).
    (tmp_path / package / "__init__.py").write_text(textwrap.dedent("""\
        import sys, threading, time
        sys.deferred_runs.append(1)
        me = sys.modules[__name__]
        def ask():
            try:
                sys.deferred_got = me.LATE
            except AttributeError as exc:
                sys.deferred_got = exc
        t = sys.deferred_thread = threading.Thread(target=ask)
        t.start()
        # Until the thread has its answer, or waits for it inside the
        # package's lookup (its innermost frame: the lock is taken in C).
        deadline = time.monotonic() + 30
        while t.is_alive() and time.monotonic() < deadline:
            frame = sys._current_frames().get(t.ident)
            if frame is not None and frame.f_code.co_name == "__call__" \
                    and frame.f_code.co_filename.endswith("console.py"):
                break
            time.sleep(0.001)
        sys.deferred_early = hasattr(me, "LATE")
        LATE = "set"
        """))
    for attr in ("deferred_got", "deferred_thread", "deferred_early"):
        monkeypatch.setattr(sys, attr, None, raising=False)
    defer_init(package)
    with pytest.raises(AttributeError):
        sys.modules[package].NOT_THERE  # noqa: B018  # runs the __init__
    t: threading.Thread = sys.deferred_thread  # type: ignore[attr-defined]
    t.join(30)
    assert not t.is_alive()
    assert sys.deferred_got == "set"  # type: ignore[attr-defined]
    assert sys.deferred_early is False  # type: ignore[attr-defined]
    assert runs() == 1


#: The same families encoded by prometheus_client's exposition, imported as
#: the console script's `exec` imports it (argv[1] "without") or as usual.
ENCODE = textwrap.dedent(r"""
    import sys
    from orchestrator_push.console import SERVER_SIDE, defer_init, import_without
    if sys.argv[1] == "without":
        defer_init("prometheus_client")
        import_without("prometheus_client.exposition", SERVER_SIDE)
    from prometheus_client import exposition
    from prometheus_client.metrics_core import (
        CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
    class Families:
        def collect(self):
            g = GaugeMetricFamily("g", 'help "quoted"\\n', labels=["flow"])
            g.add_metric(['a"b\\c\nd'], 1.5)
            g.add_metric(["x"], float("nan"))
            c = CounterMetricFamily("c", "a counter", labels=["status"])
            c.add_metric(["ok"], 3)
            h = HistogramMetricFamily("h", "a histogram", labels=["t"])
            h.add_metric(["t1"], [("0.5", 1), ("+Inf", 2)], sum_value=2.5)
            return [g, c, h]
    sys.stdout.buffer.write(exposition.generate_latest(Families()))
    if sys.argv[1] == "without":
        missing = [m for m in SERVER_SIDE if m in sys.modules]
        try:
            exposition.push_to_gateway("127.0.0.1:1", job="j", registry=Families())
        except RuntimeError as exc:
            refused = "placeholder" in str(exc)
        import urllib.request  # the real one: the placeholder is gone
        print("\n", missing, refused, urllib.request.Request("http://x/").full_url)
    """)


def test_the_exposition_without_its_server_encodes_as_the_real_one() -> None:
    usual, without = (subprocess.run([sys.executable, "-c", ENCODE, how], capture_output=True,
                                     text=True, timeout=60, cwd="/") for how in ("usual", "without"))
    assert (usual.returncode, usual.stderr, without.returncode, without.stderr) == (0, "", 0, "")
    assert 'g{flow="a\\"b\\\\c\\nd"} 1.5' in usual.stdout  # the escapes at work
    assert without.stdout == usual.stdout + "\n [] True http://x/\n"


@pytest.fixture
def importer(package: str, tmp_path: Path) -> tuple[str, Path]:
    """`package.heavy` (its import counted) and `package.user`, which uses it."""
    (tmp_path / package / "heavy.py").write_text(
        "import sys\nsys.deferred_runs.append('heavy')\nclass Base:\n    pass\n")
    return package, tmp_path / package / "user.py"


def test_an_import_without_a_module_gets_placeholders_that_refuse_to_run(
        importer: tuple[str, Path]) -> None:
    package, user = importer
    user.write_text("from .heavy import Base\nclass Server(Base):\n    pass\n")
    import_without(f"{package}.user", [f"{package}.heavy"])
    mod = sys.modules[f"{package}.user"]
    assert sys.deferred_runs == [1]  # type: ignore[attr-defined]  # the package, not heavy
    assert f"{package}.heavy" not in sys.modules
    with pytest.raises(RuntimeError, match=f"{package}.heavy.Base is a placeholder"):
        mod.Server()
    heavy = __import__(f"{package}.heavy", fromlist=["Base"])  # later: the real one
    assert sys.deferred_runs == [1, "heavy"] and heavy.Base() is not None  # type: ignore[attr-defined]


def test_an_import_that_fails_with_placeholders_is_forgotten(
        importer: tuple[str, Path]) -> None:
    package, user = importer
    user.write_text("from .heavy import Base\nBASE = Base()\n")  # runs it at import
    __import__(package)  # as prometheus_client is, deferred
    import_without(f"{package}.user", [f"{package}.heavy"])
    assert sorted(m for m in sys.modules if m.startswith(package)) == [package, f"{package}.part"]
    mod = __import__(f"{package}.user", fromlist=["BASE"])  # as if nothing happened
    assert type(mod.BASE).__module__ == f"{package}.heavy"
    assert sys.deferred_runs == [1, "heavy"]  # type: ignore[attr-defined]
