"""Entry point of the bundled mooncake plugin: registers its components."""

from specforge_core import hookimpl  # noqa: F401
