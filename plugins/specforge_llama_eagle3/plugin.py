"""Entry point of the bundled llama_eagle3 plugin: registers its components."""

from specforge_core import hookimpl  # noqa: F401
