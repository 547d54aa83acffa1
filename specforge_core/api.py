"""Composing a run from Python, with or without TOML.

    from specforge_core.api import Pipeline

    # from files + overrides, exactly like the CLI
    result = Pipeline.from_files("configs/quickstart.toml", overrides=["training.max_steps=10"]).run()

    # no TOML at all: sections as dicts, components by name (model.draft, training.loss, ...)
    pipe = Pipeline.from_dict({
        "model": {"target": "configs/assets/tiny-target"},
        "dataset": {"path": ["configs/assets/data/sample_chat.jsonl"]},
        "training": {"max_steps": 10},
    })
    backend = pipe.build("target_backend", pipe.config, "cpu")   # or your own TargetBackend instance
    result = pipe.run(target_backend=backend)

``Pipeline(config, registry=...)`` builds and runs with that registry (e.g. one with in-process
plugins from ``registry.registry_from``); the Ray pipeline's actors always use the entry points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from specforge_core.config import load_config
from specforge_core.config.schema import SpecforgeConfig


class Pipeline:
    """A resolved config plus the registry that turns its component names into instances."""

    def __init__(self, config: SpecforgeConfig, registry: Any = None) -> None:
        from specforge_core.registry import get_registry

        self.config = config
        self.registry = registry if registry is not None else get_registry()

    @classmethod
    def from_files(cls, *paths: str | Path, overrides: Sequence[str] = (), registry: Any = None) -> Pipeline:
        return cls(cls._load(paths, overrides, None, registry), registry)

    @classmethod
    def from_dict(cls, data: Mapping, overrides: Sequence[str] = (), registry: Any = None) -> Pipeline:
        return cls(cls._load((), overrides, data, registry), registry)

    @staticmethod
    def _load(paths: Sequence, overrides: Sequence[str], data: Optional[Mapping], registry: Any) -> SpecforgeConfig:
        kwargs: dict[str, Any] = {"data": data}
        if registry is not None:
            kwargs["registry"] = registry
        return load_config(list(paths), list(overrides), **kwargs)

    def build(self, kind: str, *args: Any, **kwargs: Any) -> Any:
        """The component this config selects for ``kind``, built with its options."""
        return self.registry.create_for(self.config, kind, *args, **kwargs)

    def run(self, **components: Any) -> Any:
        """Run the configured pipeline; ``components`` are ready-made instances to use instead of
        building them (``target_backend=...``, ``transfer_store=...``)."""
        from specforge_core.pipeline import run_pipeline

        return run_pipeline(self.config, registry=self.registry, **components)
