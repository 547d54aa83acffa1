"""Tiny real HF models for tests and examples (random weights, real architectures, no hub).

At least 8 layers by default so the EAGLE-3 default aux layers (2, L//2, L-3) are distinct.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_config(
    family: str = "llama",
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 4096,
):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_tiny_model(
    path: Optional[str | Path] = None,
    family: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: Optional[str] = None,
    **config_kwargs,
):
    """Build a random tiny causal LM; save it to ``path`` if given (optionally sharded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    # Random init in HF is small-std; scale the LM head so distributions are not near uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.eval()
    if path is not None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return model
