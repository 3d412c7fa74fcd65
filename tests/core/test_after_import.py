"""after_import: a hook runs once a module is executed, by whatever import."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from orchestrator_push import after_import


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("op_after_")]:
        del sys.modules[name]


def test_a_hook_runs_after_the_module_executed(module_dir: Path) -> None:
    (module_dir / "op_after_a.py").write_text("VALUE = 41\nclass C:\n    pass\n")
    seen: list[int] = []

    def patch(module: ModuleType) -> None:
        seen.append(module.VALUE)
        module.C.patched = True

    after_import.when_imported("op_after_a", patch)
    assert seen == []
    module = importlib.import_module("op_after_a")
    assert seen == [41] and module.C.patched is True
    importlib.reload(module)  # a hook runs once
    assert seen == [41]
    assert module.__loader__.get_source("op_after_a").startswith("VALUE")


def test_a_module_already_imported_is_patched_now(module_dir: Path) -> None:
    (module_dir / "op_after_b.py").write_text("VALUE = 2\n")
    importlib.import_module("op_after_b")
    seen: list[str] = []
    after_import.when_imported("op_after_b", lambda m: seen.append(m.__name__))
    assert seen == ["op_after_b"]


def test_a_failing_hook_never_breaks_the_import(module_dir: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    (module_dir / "op_after_c.py").write_text("VALUE = 3\n")

    def broken(module: ModuleType) -> None:
        raise RuntimeError("boom")

    after_import.when_imported("op_after_c", broken)
    assert importlib.import_module("op_after_c").VALUE == 3
    assert "could not patch op_after_c" in caplog.text


def test_a_forgotten_hook_does_not_run(module_dir: Path) -> None:
    (module_dir / "op_after_d.py").write_text("VALUE = 4\n")
    seen: list[str] = []
    after_import.when_imported("op_after_d", lambda m: seen.append(m.__name__))
    after_import.forget("op_after_d")
    importlib.import_module("op_after_d")
    assert seen == []
