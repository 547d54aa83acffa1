"""``input_embedding_scale``: the factor a target's decoder layers apply to its embedding rows,
checked against transformers' own forward (the input of layer 0 over the table's rows) on tiny
in-process models of each family it names, and the DFlash (and DSpark) draft built from such a target reads
exactly those rows (what vLLM's DFlash draft reads from the export: tests/test_gemma3_dflash_vllm.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from specforge_core.hfconfig import input_embedding_scale

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=320, max_position_embeddings=256)


def _tiny(family: str):
    import transformers as tf

    if family == "llama":
        cfg = tf.LlamaConfig(**COMMON)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**COMMON)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**COMMON, sliding_window=16)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**COMMON, sliding_window=16, query_pre_attn_scalar=16)
    elif family == "granite":
        cfg = tf.GraniteConfig(**COMMON, embedding_multiplier=3.5)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**COMMON)
    else:
        raise AssertionError(family)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _layer0_input(model, ids: torch.Tensor) -> torch.Tensor:
    seen = {}

    def hook(_module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids[None])
    handle.remove()
    return seen["x"][0]


@pytest.mark.parametrize("family,expected", [("llama", 1.0), ("qwen3", 1.0), ("gemma", 8.0), ("gemma2", 8.0),
                                             ("gemma3_text", 8.0), ("granite", 3.5)])
def test_the_scale_is_what_transformers_layers_read(family, expected):
    model = _tiny(family)
    scale = input_embedding_scale(model.config.to_dict())
    assert scale == expected  # sqrt(64) for Gemma
    ids = torch.tensor([1, 5, 17, 200, 319])
    seen = _layer0_input(model, ids)
    raw = model.get_input_embeddings().weight[ids].detach()
    torch.testing.assert_close(seen, raw * scale, rtol=1e-6, atol=0)
    if scale != 1.0:  # and not the raw table
        assert not torch.allclose(seen, raw)


def test_a_multimodal_config_reads_its_text_config():
    cfg = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 640}}
    assert input_embedding_scale(cfg) == pytest.approx(640**0.5)
    assert input_embedding_scale({"model_type": "minicpm3", "scale_emb": 12}) == 12.0
    assert input_embedding_scale({"model_type": "llama", "embedding_multiplier": True}) == 1.0  # not a number


@pytest.mark.parametrize("algo", ["dflash", "dspark"])
@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_the_dflash_draft_reads_the_rows_the_targets_layers_read(family, algo):
    if algo == "dflash":
        from specforge_dflash.plugin import DFlashAlgorithm as Algorithm
        from specforge_dflash.plugin import DFlashOptions as Options
    else:
        from specforge_dspark.plugin import DSparkAlgorithm as Algorithm
        from specforge_dspark.plugin import DSparkOptions as Options

    model = _tiny(family)
    hf = model.config.to_dict()
    table = model.get_input_embeddings().weight.detach().float()
    target = SimpleNamespace(hf_config=hf, aux_layer_ids=[2, 4, 6])
    vocab = SimpleNamespace(d2t=torch.zeros(64, dtype=torch.int64))
    weights = SimpleNamespace(embedding=lambda: table.clone(), head_rows=lambda: table[:64].clone())
    draft = Algorithm(Options(block_size=4, num_layers=2)).build(target, vocab, weights)
    ids = torch.arange(hf["vocab_size"])
    torch.testing.assert_close(draft.embed_tokens.weight.detach(), _layer0_input(model, ids), rtol=1e-6, atol=0)
