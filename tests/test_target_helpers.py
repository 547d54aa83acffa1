"""specforge_core.target: aux-layer rules, target config, and reading embedding/head from safetensors
(checked against the tensors of the instantiated tiny model)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from specforge_llama_eagle3.config import default_aux_layer_ids as default_aux_layers

import specforge_core.target as target
from specforge_core.target import (
    load_target_config,
    load_target_head_and_embedding,
    resolve_aux_layers,
    target_info,
)
from specforge_core.testing import make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------ aux layers
def test_eagle3_default_aux_layers():  # llama-eagle3's FeatureSpec.default_aux_layers
    assert default_aux_layers(32) == [2, 16, 29]
    assert default_aux_layers(36) == [2, 18, 33]
    assert default_aux_layers(8) == [2, 4, 5]


def test_resolve_aux_layers_explicit():
    assert resolve_aux_layers([1, 3, 7], 8) == [1, 3, 7]
    assert resolve_aux_layers([1, 2, 3, 4], 8) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "layers, match",
    [
        ([0, 3, 5], r"model\.aux_layers.*\[0\].*1\.\.7"),
        ([2, 4, 8], r"model\.aux_layers.*\[8\].*1\.\.7"),
        ([2, 2, 5], r"model\.aux_layers.*distinct and increasing"),
        ([5, 2, 4], r"model\.aux_layers.*distinct and increasing"),
    ],
)
def test_resolve_aux_layers_errors(layers, match):
    with pytest.raises(ValueError, match=match):
        resolve_aux_layers(layers, 8)


def test_no_core_default():
    # the core has no default: the draft algorithm's fills model.aux_layers in first (with_aux_layers)
    with pytest.raises(ValueError, match=r"no aux layers given.*set model\.aux_layers"):
        resolve_aux_layers([], 8)


def test_algorithm_default_too_small_target(tmp_path):
    # L=5: llama-eagle3's default would be [2, 2, 2]; the error names the draft and the fix
    from specforge_core.config import load_config

    cfg = load_config(data={"model": {"target": str(tmp_path), "draft": "llama-eagle3"}})
    with pytest.raises(ValueError, match=r"default of draft 'llama-eagle3'.*set model\.aux_layers explicitly"):
        target.with_aux_layers(cfg, num_layers=5)


# ---------------------------------------------------------------------------------------- config
# (family, tied embeddings, sharded checkpoint): every loader path once
CASES = [
    ("llama", False, False),
    ("llama", True, True),
    ("qwen2", False, True),
    ("qwen2", True, False),
    ("qwen3", False, False),
    ("qwen3", True, False),
    ("qwen3", False, True),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(family, tied, sharded) -> (path, instantiated model)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family, tied, sharded in CASES:
        path = root / f"{family}-{'tied' if tied else 'untied'}-{'sharded' if sharded else 'single'}"
        model = make_tiny_model(
            path, family, tie_word_embeddings=tied, max_shard_size="200KB" if sharded else None, seed=len(out)
        )
        out[(family, tied, sharded)] = (str(path), model)
    return out


def test_load_target_config_and_info(models):
    path, model = models[("qwen3", False, False)]
    cfg = load_target_config(path)
    assert cfg["model_type"] == "qwen3" and cfg["num_hidden_layers"] == 8
    info = target_info(path, [2, 4, 5])
    assert info.aux_layer_ids == [2, 4, 5]
    assert (info.hidden_size, info.vocab_size, info.num_hidden_layers) == (64, 512, 8)
    assert info.hf_config == cfg
    assert target_info(path, [1, 6]).aux_layer_ids == [1, 6]


def test_load_target_config_text_config(tmp_path):
    cfg = {
        "architectures": ["SomeVLM"],
        "model_type": "somevlm",
        "text_config": {"hidden_size": 32, "num_hidden_layers": 12, "vocab_size": 100, "model_type": "qwen2"},
        "vision_config": {"hidden_size": 16},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    flat = load_target_config(str(tmp_path))
    assert flat["hidden_size"] == 32 and flat["model_type"] == "qwen2" and flat["architectures"] == ["SomeVLM"]
    assert "text_config" not in flat
    info = target_info(str(tmp_path), [2, 6, 9])
    assert (info.hidden_size, info.num_hidden_layers, info.aux_layer_ids) == (32, 12, [2, 6, 9])


def test_load_target_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model.target is empty"):
        load_target_config("")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_target_config(str(tmp_path))
    # not a directory and not in the (offline) hub cache
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_target_config("no-such-org/no-such-model-xyz")


# ------------------------------------------------------------------------------ embedding + head
@pytest.mark.parametrize(
    "key",
    CASES,
    ids=lambda k: "-".join([k[0], "tied" if k[1] else "untied", "sharded" if k[2] else "single"]),
)
def test_head_and_embedding_match_model(models, key):
    path, model = models[key]
    ref_embed = model.get_input_embeddings().weight.detach()
    ref_head = model.get_output_embeddings().weight.detach()
    assert (ref_head.data_ptr() == ref_embed.data_ptr()) == key[1]  # tied really shares

    embed, head = load_target_head_and_embedding(path)
    assert torch.equal(embed, ref_embed)
    assert torch.equal(head, ref_head)
    if not key[1]:
        assert not torch.equal(head, embed)

    rows = torch.tensor([511, 3, 0, 200, 3, 77])  # unordered, with a repeat
    embed2, head_rows = load_target_head_and_embedding(path, row_ids=rows, dtype=torch.bfloat16)
    assert embed2.dtype == head_rows.dtype == torch.bfloat16
    assert head_rows.shape == (6, 64)
    assert torch.equal(head_rows, ref_head[rows].to(torch.bfloat16))


def test_head_rows_read_in_blocks(models, monkeypatch):
    # Small row blocks exercise the block-wise selection (the real block is 8192 rows).
    monkeypatch.setattr(target, "_ROW_BLOCK", 50)
    path, model = models[("qwen2", False, True)]
    rows = torch.randperm(512)[:130]
    _, head_rows = load_target_head_and_embedding(path, row_ids=rows)
    assert torch.equal(head_rows, model.lm_head.weight.detach()[rows])
    _, none = load_target_head_and_embedding(path, row_ids=torch.tensor([], dtype=torch.int64))
    assert none.shape == (0, 64)
    with pytest.raises(IndexError, match=r"\[0, 512\)"):
        load_target_head_and_embedding(path, row_ids=torch.tensor([512]))


def test_language_model_prefix_and_missing_head(tmp_path, models):
    """A multimodal-style checkpoint (language_model prefixes, text_config) and a checkpoint that
    simply lacks lm_head (so the embedding is the head)."""
    src, model = models[("qwen3", False, False)]
    sd = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.loads(open(os.path.join(src, "config.json")).read())

    vlm = tmp_path / "vlm"
    vlm.mkdir()
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    save_file(renamed, str(vlm / "model.safetensors"))
    (vlm / "config.json").write_text(json.dumps({"model_type": "x", "text_config": cfg}))
    embed, head = load_target_head_and_embedding(str(vlm))
    assert torch.equal(embed, model.model.embed_tokens.weight.detach())
    assert torch.equal(head, model.lm_head.weight.detach())

    nohead = tmp_path / "nohead"
    nohead.mkdir()
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, str(nohead / "model.safetensors"))
    (nohead / "config.json").write_text(json.dumps(cfg))
    embed, head = load_target_head_and_embedding(str(nohead), row_ids=torch.tensor([5, 1]))
    assert torch.equal(head, embed[[5, 1]])


def test_no_safetensors(tmp_path, models):
    src, _ = models[("llama", False, False)]
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_target_head_and_embedding(str(tmp_path))


# ------------------------------------------------------------------------------- draft layer shape
def _tiny(hf: dict, **shape) -> dict:
    return {**hf, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 256, **shape}


def _theta_from(inv_freq: torch.Tensor, head_dim: int) -> float:
    return float(inv_freq[1].double() ** (-head_dim / 2))  # inv_freq[i] = theta^(-2i/d)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decoder_dims_match_the_instantiated_target(family):
    """A target-shaped draft layer (DFlash, P-EAGLE) copies what transformers builds from the config:
    projection sizes, the global layers' rope theta (Gemma 3: 1e6, not its sliding layers' 1e4), eps."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from specforge_core.hfconfig import decoder_dims

    if family == "llama":  # SmolLM2's shape: no head_dim key, kv heads apart from query heads
        hf = _tiny(json.loads(open("configs/targets/SmolLM2-135M-Instruct/config.json").read()),
                   num_attention_heads=4, num_key_value_heads=2)
    else:  # head_dim set apart from hidden / heads, one kv head, per-layer-type rope
        hf = _tiny(json.loads(open("configs/targets/gemma3-270m/config.json").read()), num_attention_heads=2,
                   num_key_value_heads=1, head_dim=48, layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    d = decoder_dims(hf)
    attn, mlp = model.model.layers[-1].self_attn, model.model.layers[-1].mlp
    assert attn.q_proj.weight.shape == (d["num_attention_heads"] * d["head_dim"], d["hidden_size"])
    assert attn.k_proj.weight.shape[0] == d["num_key_value_heads"] * d["head_dim"]
    assert mlp.gate_proj.weight.shape == (d["intermediate_size"], d["hidden_size"])
    buffers = dict(model.named_buffers())
    inv = buffers.get("model.rotary_emb.full_attention_inv_freq", buffers.get("model.rotary_emb.inv_freq"))
    assert _theta_from(inv, d["head_dim"]) == pytest.approx(d["rope_theta"], rel=1e-4)
    if family == "gemma3":  # the global layers' theta, not the sliding layers' 1e4
        assert d["rope_theta"] == 1e6
    assert d["rms_norm_eps"] == pytest.approx(model.config.rms_norm_eps)
    assert decoder_dims({"model_type": "wrapper", "text_config": hf}) == d  # multimodal configs nest it


def test_mask_token_id_falls_back_to_pad_then_last_id():
    from specforge_core.hfconfig import mask_token_id

    assert mask_token_id({"pad_token_id": 0, "vocab_size": 10}, 7) == 7  # configured wins
    assert mask_token_id({"pad_token_id": 0, "vocab_size": 10}) == 0
    assert mask_token_id({"pad_token_id": None, "vocab_size": 10}) == 9
    assert mask_token_id({"text_config": {"pad_token_id": 3, "vocab_size": 10}}) == 3
