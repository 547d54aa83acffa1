"""``[model.llama-eagle3]`` options: the config schema of the llama-eagle3 draft algorithm."""

from __future__ import annotations

from typing import Optional

import attrs

from specforge_core.config.fields import in_range, option


@attrs.define
class LlamaEagle3Options:
    config: Optional[str] = option(
        None, "Draft config.json (HF llama keys) overriding the one generated from the target's "
        "config; its num_hidden_layers (if set) must equal num_layers, and hidden_size and vocab_size the "
        "target's", path=True)
    num_layers: int = option(
        1, "Draft decoder layers. 1 = the EAGLE-3 paper's draft (served by SGLang and vLLM); N > 1 = "
        "vLLM's multi-layer llama_eagle3: layer 0 reads [embedding; hidden] as usual, layers 1..N-1 are "
        "plain Llama layers on the hidden stream (exported as num_hidden_layers = N, weights layers.{i}.*; "
        "SGLang serves only 1)", validator=in_range(1, 16))
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
    activation_checkpointing: bool = option(
        False, "Recompute each TTT step's residual + MLP block in backward instead of keeping its "
        "activations (long rows: ~5.6 GB less per step at 32k tokens of an 8B-shaped draft for ~+6% step "
        "time; 65k-token rows fit on an 80 GB GPU)")
    ttt_length: int = option(
        7, "Training-time test: draft steps unrolled and trained per position (the EAGLE-3 paper: 7)",
        validator=in_range(1, 64))
    step_weight_decay: float = option(
        0.8, "Weight of TTT step k in the objective is step_weight_decay**k (EAGLE-3 uses 0.8)",
        validator=in_range(0, 1))
    fc_norm: bool = option(
        False, "EAGLE-3.1: RMS-norm each captured aux hidden state (its own weight) before fc; exported as "
        "config fc_norm = true + fc_norm.{i}.weight, as speculators and vLLM's llama_eagle3 load it")
    norm_output: bool = option(
        False, "EAGLE-3.1: the next draft step reads the normed output RMSNorm(a_t) instead of a_t (in TTT "
        "and at inference); exported as config norm_output = true, which vLLM's llama_eagle3 applies")
