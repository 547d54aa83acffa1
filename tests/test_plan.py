"""`specforge plan` arithmetic, checked against hand-computed values for Qwen3-8B and against real
models (parameter counts of tiny HF targets and of a real llama-eagle3 draft)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specforge_core import plan as P
from specforge_core.checks import check_config
from specforge_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
HF_RECIPE = str(ROOT / "configs/qwen3-8b-hf-1node-3gpu.toml")
QWEN = json.loads((ROOT / "configs/targets/Qwen3-8B/config.json").read_text())


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their target/draft files relative to the repo root


def _cfg(*overrides, path=HF_RECIPE):
    return load_config([path], list(overrides))


# --------------------------------------------------------------------------- Qwen3-8B by hand
def test_qwen3_8b_hidden_state_bytes():
    # aux 3 x 4096 + final 4096 values in bf16, + int64 input_ids + int64 argmax + uint8 loss_mask
    per_token = 3 * 4096 * 2 + 4096 * 2 + 8 + 8 + 1
    assert per_token == 32785
    plan = P.build_plan(_cfg())
    assert plan["bytes_per_token"] == per_token
    assert plan["bytes_per_sample"] == per_token * 4096 == 134_287_360
    assert plan["pool_samples"] == 8 * 1024**3 // 134_287_360 == 63
    # fp32 hidden states double the hidden-state part only
    assert P.build_plan(_cfg("inference.dtype=fp32"))["bytes_per_token"] == 4 * 4096 * 4 + 17


def test_hidden_bytes_agree_with_mooncake_sizing():
    from specforge_mooncake.sizing import bytes_per_token, compute_sizes

    assert P.hidden_bytes_per_token(4096, 3, 2) == bytes_per_token(4096, 3, 2)
    plan = P.build_plan(_cfg("transfer.store=mooncake"))
    assert plan["mooncake"] == compute_sizes(4096, 3, 4096, 8 * 1024**3, 2)


def test_qwen3_8b_draft_parameters():
    fc = 3 * 4096 * 4096
    qkv = 2 * 4096 * (32 * 128 + 2 * 8 * 128)  # q/k/v read cat(embedding, hidden): 2H inputs
    o = 32 * 128 * 4096
    mlp = 3 * 4096 * 12288
    norms = 4 * 4096
    head = 4096 * 32000
    plan = P.build_plan(_cfg())
    assert plan["draft_trainable"] == fc + qkv + o + mlp + norms + head == 399_523_840
    assert plan["draft_frozen"] == 151936 * 4096 == 622_329_856


def test_qwen3_8b_training_memory():
    trainable, frozen, n = 399_523_840, 622_329_856, 2  # fsdp2 'full' over 2 trainers
    # saved per token per TTT step (bf16): 8H + 4*nh*hd + 4I values, + 4 RMSNorms' fp32 inputs
    per_token_step = 2 * (8 * 4096 + 4 * 32 * 128 + 4 * 12288) + 16 * 4096
    assert per_token_step == 262_144
    head_grad = 2 * 32000 * 4096  # the fused loss keeps each step's draft-head gradient (bf16)
    once = 4096 * 2 * (3 * 4096 + 4096 + 4096)  # aux + final hidden states of the batch, fc output
    m = P.build_plan(_cfg())["train_memory"]
    assert m.weights == 4 * trainable // n + 2 * trainable  # fp32 master shard + bf16 compute copy
    assert m.grads == 4 * trainable // n
    assert m.optimizer == 8 * trainable // n
    assert m.frozen == 2 * (frozen + 32000 * 4096)  # embedding + target lm_head rows
    assert m.activations == 7 * (4096 * per_token_step + head_grad) + once == 9_518_972_928
    # one chunk (8192 rows, capped at the 4096 tokens) of fp32 [chunk x Vd] buffers, plus the
    # target distribution of the micro-batch held once in fp16
    assert m.workspace == 3 * 4 * min(8192, 4096) * 32000 + 2 * 4096 * 32000
    assert m.total == 15_414_231_040 - 3 * 4 * 1024 * 32000 + m.workspace
    # 'replicate' keeps full states on every rank; twice the micro batch doubles the per-token part
    r = P.build_plan(_cfg("training.fsdp2.sharding=replicate", "training.micro_batch_size=2"))["train_memory"]
    assert r.optimizer == 8 * trainable
    assert r.activations - m.activations == 7 * 4096 * per_token_step + once


def test_qwen3_8b_target_weights():
    p = P.target_params(QWEN)
    assert sum(p.values()) == 8_190_735_360  # Qwen3-8B's published parameter count
    assert P.target_weight_bytes(QWEN, 2) == 2 * 8_190_735_360
    # GQA: 8 KV heads x 128 x (K and V) x 36 layers x bf16, split over TP ranks up to 8
    assert P.kv_bytes_per_token(QWEN, 1) == 36 * 2 * 8 * 128 * 2
    assert P.kv_bytes_per_token(QWEN, 4) == 36 * 2 * 2 * 128 * 2


# ------------------------------------------------------------------- against real models
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_target_params_match_real_hf_models(family, tied):
    from transformers import AutoModelForCausalLM

    from specforge_core.testing import tiny_config

    hf = tiny_config(family, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    assert sum(P.target_params(hf.to_dict()).values()) == sum(p.numel() for p in model.parameters())


def test_draft_params_match_real_draft():
    from specforge_llama_eagle3.algorithm import build_draft, draft_params

    from specforge_core.testing import tiny_config
    from specforge_core.types import TargetInfo

    t = tiny_config("qwen3").to_dict()
    info = TargetInfo(model_path="tiny", hf_config=t, aux_layer_ids=[2, 4, 5], hidden_size=64,
                      vocab_size=512, num_hidden_layers=8)
    draft = build_draft(None, info, draft_vocab_size=100)
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in draft.parameters() if not p.requires_grad)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "vocab_size": 512, "draft_vocab_size": 100, "target_hidden_size": 64}
    assert draft_params(shape, 3) == (trainable, frozen)


# --------------------------------------------------------------------------------- placement
def test_placement_multi_node_tp():
    cfg = _cfg(path=str(ROOT / "configs/kimi-k2.5-sglang-2x8-h200.toml"))
    roles = P.place(cfg).roles
    assert roles[0][:4] == [f"engine 0 tp{i}" for i in range(4)]
    assert roles[1][:4] == [f"engine 0 tp{i}" for i in range(4, 8)]
    assert roles[0][4:] == [f"trainer {i}" for i in range(4)]
    assert roles[1][4:] == [f"trainer {i}" for i in range(4, 8)]


def test_placement_problems_and_idle_gpus():
    idle = check_config(_cfg("run.gpus_per_node=4"), inputs=False)
    assert [p.level for p in idle] == ["warning"] and "1 of 4 GPUs are idle" in idle[0].message
    too_many = [p for p in check_config(_cfg("training.num_gpus=3"), inputs=False) if p.level == "error"]
    assert too_many and "only 2 GPUs are left" in too_many[0].message


def test_memory_that_cannot_fit_is_an_error():
    probs = check_config(_cfg("dataset.max_seq_length=32768", "training.micro_batch_size=2"), inputs=False)
    assert any(p.level == "error" and p.key == "dataset.max_seq_length" and "GiB" in p.message for p in probs)


def test_plan_cli_prints_placement_and_numbers():
    out = subprocess.run([sys.executable, "-m", "specforge_core.cli", "plan", HF_RECIPE], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "node 0: GPU 0: engine 0 (TP rank 0); GPU 1-2: trainer rank 0-1" in out.stdout
    assert "32,785 B/token" in out.stdout and "399,523,840 trainable" in out.stdout
