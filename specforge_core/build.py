"""The one place a run builds components (through an explicit plugin registry).

Every builder takes the registry to use; ``None`` means the process-wide one (entry points), so a
``Pipeline(registry=...)`` builds and runs with the same registry it was given. A neutral module:
data, training, the run and export all build through it.
"""

from __future__ import annotations

from typing import Any

from specforge_core.config.schema import SpecforgeConfig
from specforge_core.registry import get_registry


def resolve(registry: Any = None) -> Any:
    if registry is not None:
        return registry
    return get_registry()


def create(config: SpecforgeConfig, kind: str, *args: Any, registry: Any = None, **kwargs: Any) -> Any:
    """Build the component of ``kind`` that ``config`` selects, with its options table."""
    return resolve(registry).create_for(config, kind, *args, **kwargs)


def algorithm(config: SpecforgeConfig, registry: Any = None) -> Any:
    """The configured draft algorithm (``model.draft``); cheap to build."""
    return create(config, "draft_algorithm", config, registry=registry)
