"""``specforge plan``'s KV-cache bytes for a target with sliding-window layers (Gemma 3: 15 of 18
layers slide over 512 tokens), against transformers' own cache objects built from the shipped
config (``configs/targets/gemma3-270m``, no weights needed) and against a hand count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_core import plan as P

ROOT = Path(__file__).resolve().parent.parent
GEMMA = json.loads((ROOT / "configs" / "targets" / "gemma3-270m" / "config.json").read_text())
QWEN = json.loads((ROOT / "configs" / "targets" / "Qwen3-8B" / "config.json").read_text())
PER_LAYER = 2 * 1 * 256 * 2  # K and V, 1 KV head of 256, bf16


def _hf_cache(tokens: int):
    """transformers' DynamicCache for the real config after a prefill of ``tokens`` tokens: what each
    layer's attention read during the prefill, and what each layer keeps afterwards (in tokens)."""
    from transformers import DynamicCache, Gemma3TextConfig

    cfg = Gemma3TextConfig(**{k: v for k, v in GEMMA.items() if k not in ("architectures", "model_type")})
    cache = DynamicCache(config=cfg)
    k = torch.zeros(1, cfg.num_key_value_heads, tokens, cfg.head_dim, dtype=torch.bfloat16)
    read = [cache.update(k, k.clone(), i)[0].shape[-2] for i in range(cfg.num_hidden_layers)]
    kept = [layer.keys.shape[-2] for layer in cache.layers]
    return cache, read, kept


def _bytes(token_counts: list[int]) -> int:
    return sum(token_counts) * PER_LAYER


def test_the_layer_windows_are_the_configs():
    windows = P.kv_layer_windows(GEMMA)
    assert [i for i, w in enumerate(windows) if w is None] == [5, 11, 17]  # the global layers
    assert {w for w in windows if w is not None} == {512}
    assert P.kv_layer_windows(QWEN) == [None] * 36  # no layer_types: every layer attends to all


@pytest.mark.parametrize("tokens", [100, 511, 512, 513, 700, 2048])
def test_kv_bytes_equal_transformers_cache_for_the_real_config(tokens):
    cache, read, kept = _hf_cache(tokens)
    # between forwards a sliding layer keeps window - 1 tokens (nothing in flight)
    assert P.kv_bytes(GEMMA, 1, tokens, 2, in_flight=0) == _bytes(kept)
    # during the prefill every layer held every token (a capture's peak)
    assert P.kv_bytes(GEMMA, 1, tokens, 2) == _bytes(read) == P.kv_bytes_per_token(GEMMA, 1, 2) * tokens
    # one decoding step later: what the step's attention reads (window - 1 kept + the new token)
    step = torch.zeros(1, 1, 1, 256, dtype=torch.bfloat16)
    read1 = [cache.update(step, step.clone(), i)[0].shape[-2] for i in range(18)]
    assert P.kv_bytes(GEMMA, 1, tokens + 1, 2, in_flight=1) == _bytes(read1)


def test_kv_bytes_by_hand_at_long_context():
    # 32k tokens decoding: 3 global layers hold all of them, 15 sliding layers 511 + 1
    T = 32768
    assert P.kv_bytes(GEMMA, 1, T, 2, in_flight=1) == (3 * T + 15 * 512) * 1024
    # the old count (every layer, every token) was 5.6x that
    assert round(P.kv_bytes_per_token(GEMMA, 1, 2) * T / P.kv_bytes(GEMMA, 1, T, 2, in_flight=1), 1) == 5.6
    # a target without sliding layers: per token x tokens, whatever is in flight
    assert P.kv_bytes(QWEN, 2, T, 2, in_flight=1) == P.kv_bytes_per_token(QWEN, 2, 2) * T


def test_plan_prints_both_figures_for_a_sliding_target():
    from specforge_core.config import load_config

    cfg = load_config([ROOT / "configs" / "gemma3-270m-sharegpt.toml"],
                      overrides=[f"model.target_config={ROOT / 'configs' / 'targets' / 'gemma3-270m'}"])
    plan = P.build_plan(cfg)
    T = cfg.dataset.max_seq_length
    assert plan["kv_sliding_layers"] == 15
    assert plan["kv_decode_bytes"] == (3 * T + 15 * min(T, 512)) * 1024
    text = P.format_plan(cfg, plan, [])
    assert "15 of 18 layers slide (window 512)" in text and f"{plan['kv_decode_bytes'] / P.MiB:.1f} MiB" in text
