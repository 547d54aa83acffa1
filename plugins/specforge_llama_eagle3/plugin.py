"""Entry point of the bundled llama_eagle3 plugin: registers the ``llama-eagle3`` draft algorithm."""

from __future__ import annotations

from typing import Optional

import attrs

from specforge_core import hookimpl
from specforge_core.config.fields import in_range, option
from specforge_llama_eagle3.algorithm import make_llama_eagle3


@attrs.define
class LlamaEagle3Options:
    config: Optional[str] = option(
        None, "Draft config.json (HF llama keys) overriding the one generated from the target's "
        "config; it must keep num_hidden_layers = 1 and the target's hidden_size and vocab_size", path=True)
    init_from: Optional[str] = option(
        None, "Exported draft directory (config.json + model.safetensors) to start training from", path=True)
    attention: str = option(
        "auto", "TTT attention kernel for the causal part: 'eager' (explicit scores, exact for any "
        "padding), 'sdpa' (PyTorch fused kernels with a differentiable log-sum-exp, right padding), "
        "'flex' (FlexAttention with log-sum-exp gradient, right padding; fastest on GPU), "
        "'auto' = flex on GPU, eager on CPU", choices=("auto", "eager", "sdpa", "flex"))
    compile: str = option(
        "auto", "torch.compile the TTT step's dense parts (RMSNorms, rope, SwiGLU, residuals around the "
        "GEMMs): 'auto' = on CUDA only, 'on', 'off'", choices=("auto", "on", "off"))
    step_weight_decay: float = option(
        0.8, "Weight of TTT step k in the objective is step_weight_decay**k (EAGLE-3 uses 0.8)",
        validator=in_range(0, 1))
    fc_norm: bool = option(
        False, "EAGLE-3.1: RMS-norm each captured aux hidden state (its own weight) before fc; exported as "
        "config fc_norm = true + fc_norm.{i}.weight, as speculators and vLLM's llama_eagle3 load it")
    aux_ids_convention: str = option(
        "sglang", "Ignored (kept so older configs load): the export now writes non-default aux layers "
        "for both engines, top-level eagle_aux_hidden_state_layer_ids in vLLM's numbering (HF index) and "
        "eagle_config's in SGLang's (HF index - 1)", choices=("sglang", "vllm"))


@hookimpl
def register_draft_algorithms(register):
    register("llama-eagle3", make_llama_eagle3, config=LlamaEagle3Options,
             description="EAGLE-3 draft: fc over 3 target layers + one Llama decoder layer "
             "(SGLang/vLLM LlamaForCausalLMEagle3)")
