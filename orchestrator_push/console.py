"""The ``orchestrator-push`` console script: :func:`orchestrator_push.cli.main`
in a process that ends with it.

``exec`` starts with every run of a cron job or CI step, so its start-up is
measured against a hand-written ``prometheus_client`` push script
(docs/performance.md, ``bench/bench_exec.py``). These costs are the process's,
not the command's, and this module removes them:

- ``prometheus_client``'s ``__init__`` imports the whole library (every metric
  type, the process, platform and gc collectors, with ``inspect`` and
  ``platform``), while a push needs two of its modules: about 10 ms of
  imports (65 ms against 55, Python 3.11). The package's ``__init__``
  runs at the first use of a name it defines, not before (:func:`defer_init`).
- Its ``exposition`` (where ``generate_latest`` is) imports, for its HTTP
  server, WSGI app and push functions, ``http.server``, ``wsgiref``,
  ``urllib.request`` and more, none of which a push of ours calls (it sends
  with :mod:`http.client`): about 9 ms (Python 3.11). ``exec`` imports it
  with placeholders for those names (:func:`import_without`).
- :mod:`logging` (about 4 ms) when nothing is logged, and :mod:`encodings.idna`
  before a connection needs it: ``exec`` starts no thread, so nothing is
  imported ahead of a thread (preimport.py).
- :mod:`inspect`, about 4 ms, which :mod:`dataclasses` imports and, before
  Python 3.12, uses only for a class without a docstring: deferred alike.
- The collector: about 4 ms of collections while the imports build their
  objects, about 12 ms of a last collection over all of them at exit. Frozen
  objects are never collected, which only a process about to end can afford
  for all of them.
- The interpreter's teardown at ``exec``'s exit, about 7 ms of freeing every
  module's objects one by one: :func:`exit_now`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from importlib.abc import Loader

#: What ``prometheus_client.exposition`` imports for its HTTP server, WSGI app,
#: push functions and compressed answers: none of it encodes a push.
SERVER_SIDE = (
    "gzip",
    "http.server",
    "socketserver",
    "urllib.error",
    "urllib.request",
    "wsgiref.simple_server",
)


def defer_init(package: str) -> None:
    """Make ``package`` importable without running its ``__init__``: its
    submodules import as usual, and the first lookup of any other name on the
    package runs the ``__init__`` (once, whichever thread asks first; the
    others wait for it) and answers it. A plain module is deferred alike: its
    code runs at the first lookup of a name on it. A package or module
    already imported, or not found, is left alone."""
    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None:
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


def import_without(module: str, unused: Iterable[str]) -> None:
    """Import ``module`` while the modules ``unused`` (those not imported yet)
    are placeholders: each name taken from them is a class that raises
    :class:`RuntimeError` when called or instantiated. For a process that uses
    none of those names. The placeholders are gone from :data:`sys.modules`
    afterwards (a later import gets the real module); if the import fails with
    them, what it imported is forgotten and a later import is a plain one."""
    if module in sys.modules:
        return
    absent = [name for name in unused if name not in sys.modules]
    before = set(sys.modules)
    for name in absent:
        sys.modules[name] = _Placeholders(name, module)
    try:
        importlib.import_module(module)
    except Exception:
        for name in set(sys.modules) - before:
            del sys.modules[name]
    finally:
        for name in absent:
            if isinstance(sys.modules.get(name), _Placeholders):
                del sys.modules[name]


class _Placeholders(ModuleType):
    """A module imported by another one for names this process never uses."""

    def __init__(self, name: str, importer: str) -> None:
        super().__init__(name)
        self._importer = importer

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        what = f"{self.__name__}.{name}"
        why = (
            f"{what} is a placeholder: this process imported {self._importer} "
            "without it (orchestrator_push.console.import_without)"
        )

        def refuse(*_args: object, **_kwargs: object) -> NoReturn:
            raise RuntimeError(why)

        placeholder = type(name, (), {"__init__": refuse, "__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


def lighten(command: str | None) -> None:
    """Spare the process of ``command`` (``exec``, ``status``, ...) the imports
    it has no use for, before it imports anything else."""
    defer_init("prometheus_client")
    if command == "exec":  # the operator's commands may serve, fetch and log
        import_without("prometheus_client.exposition", SERVER_SIDE)
        if sys.version_info < (3, 12):  # later, dataclasses reads annotations with it
            defer_init("inspect")


def run() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    gc.disable()
    lighten(command)
    from .cli import main  # the imports: nothing they build is garbage

    # Collections go on while the command runs (it may run for hours), over
    # what it makes, not over what the imports made.
    gc.freeze()
    gc.enable()
    code = main()
    gc.freeze()  # main() has closed what it opened: the exit frees the rest
    if command == "exec":
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> NoReturn:
    """End a process that has finished its work and has no thread (``exec``'s:
    its command reaped, its pushes made, its connection closed) without the
    interpreter's teardown, which frees every module's objects one by one
    (about 7 ms, for what the system frees at once). What a normal exit does
    that matters still happens: the exit handlers run, the standard streams
    are flushed (a closed pipe does not change the exit code, the command's)."""
    atexit._run_exitfuncs()  # private, stable since 3.0: what the teardown would call
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
