"""Zero-code activation that does not depend on Prefect's plugin loader.

Prefect runs its plugins during ``import prefect`` with ``anyio.run``, which
fails when ``prefect`` is first imported inside a running event loop (an async
application, a notebook): Prefect logs "Failed to initialize plugins" and no
plugin runs. ``orchestrator_push.pth`` calls :func:`install` at interpreter
start when ``PREFECT_PLUGINS_ENABLED`` (or its older alias) is in the
environment: it waits for ``prefect`` to be imported, then does what the plugin
would have done if Prefect's own settings switch our plugin on and nothing has
run it. Importing this module does nothing else.
"""

from __future__ import annotations

from types import ModuleType

from .after_import import when_imported
from .logs import ERROR, WARNING, emit

#: Our ``prefect.plugins`` entry point's name (what PREFECT_PLUGINS_ALLOW lists).
PLUGIN = "orchestrator_push"


def switched_on(plugins: object) -> bool:
    """Prefect's plugin settings load and call our plugin (its loader's rules)."""
    allow = getattr(plugins, "allow", None)
    deny = getattr(plugins, "deny", None)
    return (
        bool(getattr(plugins, "enabled", False))
        and not getattr(plugins, "safe_mode", False)
        and not (allow and PLUGIN not in allow)
        and not (deny and PLUGIN in deny)
    )


def _after_prefect(_: ModuleType) -> None:
    from prefect.settings import get_current_settings

    from . import prefect as adapter
    from .config import ConfigError

    if adapter.instrumented() or not switched_on(get_current_settings().plugins):
        return
    try:
        adapter.instrument()
    except ConfigError as exc:  # what Prefect's loader would log for the plugin
        emit(ERROR, "orchestrator_push: not instrumented: %s", exc)
        return
    emit(
        WARNING,
        "orchestrator_push: Prefect's plugin loader did not run (was prefect first imported "
        "inside a running event loop?); instrumented after the import instead",
    )


def install() -> None:
    """Watch for ``import prefect`` (now, if it is imported already)."""
    when_imported("prefect", _after_prefect)
