"""specforge core: plugin hooks, typed configs, and the pipeline that composes components.

The core imports no plugin and no heavy backend (sglang, mooncake, ray) at import time.
"""

from specforge_core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
