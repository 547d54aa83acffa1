"""Entry point of the bundled hf_backend plugin: registers the ``hf`` target backend."""

from __future__ import annotations

from specforge_core import hookimpl
from specforge_hf_backend.options import HFBackendOptions


def make_hf_backend(options, config, device=None):
    # Imported lazily: listing plugins must not pull in transformers.
    from specforge_hf_backend.backend import HFTargetBackend

    return HFTargetBackend(options or HFBackendOptions(), config, device)


@hookimpl
def register_target_backends(register):
    register(
        "hf",
        make_hf_backend,
        config=HFBackendOptions,
        description="transformers AutoModelForCausalLM in-process; captures aux/final hidden states with hooks",
    )
