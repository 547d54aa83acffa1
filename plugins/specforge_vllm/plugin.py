"""Entry point of the bundled vllm plugin.

Importing this module must never import vLLM or torch (``specforge plugins`` lists it on any
machine): vLLM runs in a process of its own, started by the components themselves.
"""

from __future__ import annotations

from specforge_core import hookimpl
from specforge_vllm.options import VLLMBackendOptions


def make_vllm_backend(options, config, device=None):
    from specforge_vllm.backend import VLLMTargetBackend

    return VLLMTargetBackend(options if options is not None else VLLMBackendOptions(), config, device)


@hookimpl
def register_target_backends(register):
    register(
        "vllm",
        make_vllm_backend,
        config=VLLMBackendOptions,
        description="a real vLLM in its own process/venv; extract_hidden_states + KV connector capture "
        "aux/final hidden states and argmax",
    )


def run_vllm_eval(request):
    from specforge_vllm.eval_engine import run_vllm_eval as run

    return run(request)


@hookimpl
def register_eval_engines(register):
    register("vllm", run_vllm_eval,
             description="specforge eval in a real vLLM (own venv): EAGLE-3 speculative vs plain greedy, "
             "vLLM's own acceptance counters")
