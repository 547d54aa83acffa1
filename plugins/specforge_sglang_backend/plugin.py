"""Entry point of the bundled sglang_backend plugin: registers the ``sglang`` target backend.

Importing this module must never import sglang (``specforge plugins`` lists it on any machine):
the backend module imports sglang only inside its constructor.
"""

from __future__ import annotations

from specforge_core import hookimpl
from specforge_sglang_backend.options import SglangOptions


def make_sglang_backend(options, config, device=None):
    from specforge_sglang_backend.backend import SglangTargetBackend

    return SglangTargetBackend(options if options is not None else SglangOptions(), config, device)


@hookimpl
def register_target_backends(register):
    register(
        "sglang",
        make_sglang_backend,
        config=SglangOptions,
        description="sglang.Engine prefill-only requests; captures EAGLE-3 aux + final hidden states and argmax",
    )
