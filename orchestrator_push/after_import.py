"""Run a function right after a module is imported, or now if it already is.

An adapter patches classes that only some processes import (a Prefect worker's
classes are never imported in a flow-run process); importing them everywhere
just to patch them would slow every process down. ``when_imported(name, fn)``
calls ``fn(module)`` once the module has been executed, by whatever import.
"""

from __future__ import annotations

import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import importlib.abc

from .logs import warn_limited

Hook = Callable[[ModuleType], None]

_lock = threading.Lock()
_hooks: dict[str, list[Hook]] = {}


def when_imported(name: str, hook: Hook) -> None:
    """``hook(module)`` now if ``name`` is imported, else right after its import.
    A hook that raises is logged and never breaks the import."""
    module = sys.modules.get(name)
    if module is None:
        with _lock:
            module = sys.modules.get(name)
            if module is None:
                _hooks.setdefault(name, []).append(hook)
                if not any(isinstance(f, _Finder) for f in sys.meta_path):
                    sys.meta_path.insert(0, _Finder())
                return
    _call(hook, module)


def forget(name: str) -> None:
    """Drop the hooks still waiting for ``name``."""
    with _lock:
        _hooks.pop(name, None)


def _call(hook: Hook, module: ModuleType) -> None:
    try:
        hook(module)
    except Exception:
        warn_limited("after-import", "orchestrator_push: could not patch %s", module.__name__)


class _Finder:  # a meta path finder by protocol: importlib.abc costs an import
    """Finds nothing itself: for a watched name it asks the finders after it
    and wraps the loader they return."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = cast("importlib.abc.Loader", _Loader(spec.loader))
        return spec


class _Loader:
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            hooks = _hooks.pop(module.__name__, [])
        for hook in hooks:
            _call(hook, module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)
