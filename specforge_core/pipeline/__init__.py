"""Pipelines drive one ``run.recipe.Run``: data -> target -> transfer store -> trainer.

``run.pipeline`` picks one; each loads lazily (the Ray pipeline imports ray only when chosen):
``local.py`` runs the step loop in this process, ``ray_pipeline.py`` in Ray trainer actors fed by
a controller (``ray/``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # light import: Ray actors that only receive handles must not pull in torch
    from specforge_core.config.schema import SpecforgeConfig


def run_pipeline(config: SpecforgeConfig, registry: Any = None, **components: Any) -> Any:
    """Run the pipeline ``config.run.pipeline`` names. ``components`` may pass ready-made
    component instances (e.g. ``target_backend=...``) instead of building them from the config.

    ``registry``: the plugin registry the local pipeline builds every component with (None: the
    installed entry points). Ray actors run in other processes and always use the entry points.

    The semantic checks ``specforge config validate`` prints run first: an error stops the run
    before any work (``ConfigError``, one line per problem); warnings are logged."""
    from specforge_core.run.recipe import check_before_run  # lazy: this package's import stays light

    check_before_run(config, registry)
    if config.run.pipeline == "ray":
        from specforge_core.pipeline.ray_pipeline import run_ray

        return run_ray(config, **components)
    from specforge_core.pipeline.local import run_local

    return run_local(config, registry=registry, **components)
