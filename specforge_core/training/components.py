"""The one place the training path builds components (through the plugin registry)."""

from __future__ import annotations

from typing import Any

from specforge_core.config.schema import SpecforgeConfig


def create(config: SpecforgeConfig, kind: str, *args: Any, **kwargs: Any) -> Any:
    """Build the component of ``kind`` that ``config`` selects, with its options table."""
    from specforge_core.registry import get_registry

    return get_registry().create_for(config, kind, *args, **kwargs)
