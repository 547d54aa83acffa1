"""Entry point of the bundled sglang_backend plugin: registers its components."""

from specforge_core import hookimpl  # noqa: F401
