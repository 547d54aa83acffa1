"""Entry point of the bundled defaults plugin: registers its components."""

from specforge_core import hookimpl  # noqa: F401
