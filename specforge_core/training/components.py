"""Component builders, kept at this path for plugins that import them from here (``specforge_core.build``)."""

from specforge_core.build import algorithm, create, resolve

__all__ = ["algorithm", "create", "resolve"]
