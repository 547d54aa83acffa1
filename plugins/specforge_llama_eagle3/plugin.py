"""Entry point of the bundled llama_eagle3 plugin: registers the ``llama-eagle3`` draft algorithm."""

from __future__ import annotations

from specforge_core import hookimpl
from specforge_llama_eagle3.algorithm import make_llama_eagle3
from specforge_llama_eagle3.options import LlamaEagle3Options


@hookimpl
def register_draft_algorithms(register):
    register("llama-eagle3", make_llama_eagle3, config=LlamaEagle3Options,
             description="EAGLE-3 draft: fc over 3 target layers + one Llama decoder layer (num_layers: "
             "more, as vLLM serves them) (SGLang/vLLM LlamaForCausalLMEagle3)")
