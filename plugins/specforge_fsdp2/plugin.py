"""Entry point of the bundled fsdp2 plugin: registers its components."""

from specforge_core import hookimpl  # noqa: F401
