"""The ``orchestrator-push`` console script: :func:`orchestrator_push.cli.main`
in a process that ends with it.

``exec`` starts with every run of a cron job or CI step, so its start-up is
measured against a hand-written ``prometheus_client`` push script
(docs/performance.md, ``bench/bench_exec.py``). Two costs are the process's,
not the command's, and this module removes them:

- ``prometheus_client``'s ``__init__`` imports the whole library (every metric
  type, the process, platform and gc collectors, with ``inspect`` and
  ``platform``), while a push needs two of its modules: about 10 ms of
  imports (65 ms against 55, Python 3.11). The package's ``__init__``
  runs at the first use of a name it defines, not before (:func:`defer_init`).
- The collector: about 4 ms of collections while the imports build their
  objects, about 12 ms of a last collection over all of them at exit. Frozen
  objects are never collected, which only a process about to end can afford
  for all of them.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.abc import Loader
    from types import ModuleType


def defer_init(package: str) -> None:
    """Make ``package`` importable without running its ``__init__``: its
    submodules import as usual, and the first lookup of any other name on the
    package runs the ``__init__`` (once, whichever thread asks first; the
    others wait for it) and answers it. A package already imported, or not
    found, is left alone."""
    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__getattr__"] = _Init(module, spec.loader)
    sys.modules[package] = module


class _Init:
    """A package's ``__getattr__`` until its ``__init__`` has run."""

    def __init__(self, module: ModuleType, loader: Loader) -> None:
        self.module, self.loader = module, loader
        self.lock = threading.RLock()
        self.running = self.done = False

    def __call__(self, name: str) -> Any:
        with self.lock:
            if self.running:  # the __init__ itself, asking for a name it has not set yet
                raise AttributeError(name)
            if not self.done:
                self.running = True
                try:
                    self.loader.exec_module(self.module)
                except BaseException:
                    sys.modules.pop(self.module.__name__, None)  # as a failed import
                    raise
                finally:
                    self.running = False
                self.done = True
                if self.module.__dict__.get("__getattr__") is self:
                    del self.module.__dict__["__getattr__"]
        return getattr(self.module, name)


def run() -> None:
    gc.disable()
    defer_init("prometheus_client")
    from .cli import main  # the imports: nothing they build is garbage

    # Collections go on while the command runs (it may run for hours), over
    # what it makes, not over what the imports made.
    gc.freeze()
    gc.enable()
    code = main()
    gc.freeze()  # main() has closed what it opened: the exit frees the rest
    sys.exit(code)
