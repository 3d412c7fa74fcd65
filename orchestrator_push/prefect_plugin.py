"""Zero-code activation: the ``prefect.plugins`` entry point.

With ``PREFECT_PLUGINS_ENABLED=1``, Prefect calls :func:`setup_environment` at
``import prefect`` and this calls :func:`orchestrator_push.prefect.instrument`.
"""

from __future__ import annotations

from typing import Any

from prefect.plugins import register_hook

PREFECT_PLUGIN_API_REQUIRES = ">=0.1,<1"


@register_hook
def setup_environment(*, ctx: Any) -> None:
    from .prefect import instrument

    instrument()
