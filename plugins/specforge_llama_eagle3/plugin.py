"""Entry point of the bundled llama_eagle3 plugin: registers the ``llama-eagle3`` draft model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs

from specforge_core import hookimpl
from specforge_core.config.fields import option
from specforge_core.types import TargetInfo
from specforge_llama_eagle3.config import DraftConfig, DraftConfigError
from specforge_llama_eagle3.model import LlamaEagle3Draft


@attrs.define
class LlamaEagle3Options:
    config: Optional[str] = option(
        None, "Draft config.json (HF llama keys) overriding the one generated from the target's "
        "config; it must keep num_hidden_layers = 1 and the target's hidden_size and vocab_size")
    init_from: Optional[str] = option(
        None, "Exported draft directory (config.json + model.safetensors) to start training from")
    attention: str = option(
        "auto", "TTT attention kernel for the causal part: 'eager' (explicit scores, exact for any "
        "padding), 'sdpa' (PyTorch fused kernels with a differentiable log-sum-exp, right padding), "
        "'flex' (FlexAttention with log-sum-exp gradient, right padding; fastest on GPU), "
        "'auto' = flex on GPU, eager on CPU", choices=("auto", "eager", "sdpa", "flex"))
    compile: str = option(
        "auto", "torch.compile the TTT step's dense parts (RMSNorms, rope, SwiGLU, residuals around the "
        "GEMMs): 'auto' = on CUDA only, 'on', 'off'", choices=("auto", "on", "off"))
    aux_ids_convention: str = option(
        "sglang", "Ignored (kept so older configs load): the export now writes non-default aux layers "
        "for both engines, top-level eagle_aux_hidden_state_layer_ids in vLLM's numbering (HF index) and "
        "eagle_config's in SGLang's (HF index - 1)", choices=("sglang", "vllm"))


def make_llama_eagle3(options: Optional[LlamaEagle3Options], target: TargetInfo,
                      draft_vocab_size: int) -> LlamaEagle3Draft:
    options = options or LlamaEagle3Options()
    n_aux = len(target.aux_layer_ids) or 3
    if options.config:
        cfg = DraftConfig.from_file(options.config, target.hidden_size, target.vocab_size,
                                    draft_vocab_size, num_aux=n_aux)
    else:
        cfg = DraftConfig.from_target(target.hf_config, draft_vocab_size, num_aux=n_aux,
                                      source=f"{target.model_path}/config.json")
    model = LlamaEagle3Draft(cfg, aux_layer_ids=target.aux_layer_ids,
                             target_num_layers=target.num_hidden_layers,
                             aux_ids_convention=options.aux_ids_convention,
                             attention=options.attention, compile=options.compile)
    if options.init_from:
        init = Path(options.init_from)
        if not (init / "model.safetensors").exists():
            raise DraftConfigError(f"{init}: no model.safetensors (model.llama-eagle3.init_from must be "
                                   "an exported draft directory)")
        model.load_export_weights(init)
    return model


@hookimpl
def register_draft_models(register):
    register("llama-eagle3", make_llama_eagle3, config=LlamaEagle3Options,
             description="EAGLE-3 draft: fc over 3 target layers + one Llama decoder layer "
             "(SGLang/vLLM LlamaForCausalLMEagle3)")
