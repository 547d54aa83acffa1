"""Options of the ``hf`` target backend: the TOML table ``[inference.hf]``."""

from __future__ import annotations

import attrs

from specforge_core.config.fields import option, positive


@attrs.define
class HFBackendOptions:
    attn_implementation: str = option(
        "sdpa",
        "transformers attention kernel for the target ('sdpa', 'eager', 'flash_attention_2', ...)",
    )
    argmax_chunk_size: int = option(
        2048,
        "Tokens per lm_head chunk when computing the full-vocab target argmax (bounds the "
        "[tokens x vocab] logits held at once)",
        validator=positive,
    )
    device: str = option(
        "auto", "Device for the target: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ..."
    )
    output_device: str = option(
        "auto", "Where captured features live: 'cpu' (pinned host memory, one non_blocking copy per "
        "sample and one sync per batch; for transfer stores and other processes), 'same' (stay on "
        "the target's device: no host round trip when the trainer shares the GPU), or 'auto' ('same' "
        "for the one-process local pipeline with the in-process 'local' store, else 'cpu')",
        choices=("auto", "cpu", "same"),
    )
    generate_cache: str = option(
        "dynamic",
        "KV cache of this backend's text generation (`specforge data regenerate`): 'dynamic' "
        "(transformers' default, grows per token) or 'static' (one fixed-size cache per batch; "
        "transformers compiles its decode step on CUDA; prompts are sorted by length and left-padded "
        "to a multiple of generate_bucket tokens so few shapes compile). benchmarks/regen_speed.py "
        "measures both on the same prompts",
        choices=("dynamic", "static"),
    )
    generate_bucket: int = option(
        128, "With generate_cache = 'static': prompts are left-padded to a multiple of this many tokens",
        validator=positive,
    )
