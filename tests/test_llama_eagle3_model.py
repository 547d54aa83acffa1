"""llama-eagle3 draft: config generation, TTT unroll vs cached inference, export round trip."""

import json

import pytest
import torch
from safetensors.torch import save_file
from specforge_llama_eagle3 import model as model_mod
from specforge_llama_eagle3 import plugin as plugin_mod
from specforge_llama_eagle3.algorithm import build_draft
from specforge_llama_eagle3.attention import dense_ttt_attention
from specforge_llama_eagle3.config import DraftConfig, DraftConfigError, hf_aux_layer_ids
from specforge_llama_eagle3.model import EXPORT_KEYS, DraftCache, LlamaEagle3Draft
from specforge_llama_eagle3.plugin import LlamaEagle3Options

from specforge_core.registry import registry_from
from specforge_core.testing import tiny_config
from specforge_core.types import TargetInfo

H, V, VD, L = 64, 512, 128, 8


def _target(aux=None, **cfg_kwargs) -> TargetInfo:
    hf = tiny_config("llama", **cfg_kwargs).to_dict()
    return TargetInfo(model_path="/tiny", hf_config=hf, aux_layer_ids=aux or [2, L // 2, L - 3],
                      hidden_size=H, vocab_size=V, num_hidden_layers=L)


def _draft(aux=None, seed=0, options=None) -> LlamaEagle3Draft:
    torch.manual_seed(seed)
    m = build_draft(options, _target(aux), VD)
    with torch.no_grad():  # larger-than-default weights so every term matters numerically
        for _name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            else:
                p.uniform_(0.5, 1.5)
        m.embed_tokens.weight.normal_(0, 1.0)
    return m.double().eval()


def _batch(B=1, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    aux = torch.randn(B, T, 3 * H, generator=g, dtype=torch.float64)
    return ids, aux


# ------------------------------------------------------------------------------------ config
def test_plugin_registered_and_config_generated_from_target():
    # the entry point itself is covered by the core registry test; load just this plugin (fast)
    comp = registry_from([("llama-eagle3", plugin_mod)], with_entry_points=False).get("draft_algorithm",
                                                                                       "llama-eagle3")
    assert comp.config_class is LlamaEagle3Options
    from specforge_core.vocab import VocabMapping

    m = comp.factory(None, None).build(_target(), VocabMapping.from_target_ids(torch.arange(VD), V))
    c = m.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        64, 128, 4, 2, 16)
    assert (c.rms_norm_eps, c.rope_theta, c.rope_scaling) == (1e-5, 10000.0, None)
    assert (c.vocab_size, c.draft_vocab_size, c.max_position_embeddings) == (V, VD, 4096)
    assert m.midlayer.self_attn.q_proj.weight.shape == (4 * 16, 2 * H)
    assert m.midlayer.self_attn.k_proj.weight.shape == (2 * 16, 2 * H)
    assert m.fc.weight.shape == (H, 3 * H) and m.lm_head.weight.shape == (VD, H)
    assert not m.embed_tokens.weight.requires_grad


def test_legacy_rope_layout_with_llama3_scaling():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": scaling,
          "max_position_embeddings": 131072, "vocab_size": V}
    c = DraftConfig.from_target(hf, VD)
    assert c.rope_theta == 500000.0 and c.rope_scaling == scaling
    # the same as transformers computes for the target
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](
        LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=131072,
                    rope_parameters={"rope_theta": 500000.0, **scaling}), "cpu")
    assert torch.equal(LlamaEagle3Draft(c).inv_freq, ref)


def test_config_errors_name_the_field():
    hf = tiny_config("llama").to_dict()
    hf["rope_parameters"] = {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(DraftConfigError, match="rope type 'dynamic'"):
        DraftConfig.from_target(hf, VD)
    del hf["rope_parameters"]
    with pytest.raises(DraftConfigError, match="rope_theta"):
        DraftConfig.from_target(hf, VD)


def test_config_file_override_is_checked(tmp_path):
    p = tmp_path / "draft.json"
    base = {"hidden_size": H, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}
    p.write_text(json.dumps(base))
    m = build_draft(LlamaEagle3Options(config=str(p)), _target(), VD)
    assert m.config.intermediate_size == 256 and m.config.num_key_value_heads == 4
    p.write_text(json.dumps({**base, "num_hidden_layers": 2}))
    with pytest.raises(DraftConfigError, match="num_hidden_layers = 2"):
        build_draft(LlamaEagle3Options(config=str(p)), _target(), VD)
    p.write_text("{\n  \"hidden_size\": 64,\n  oops\n}")
    with pytest.raises(DraftConfigError, match="line 3"):
        build_draft(LlamaEagle3Options(config=str(p)), _target(), VD)


# ------------------------------------------------------------------------------------ TTT
def test_ttt_forward_with_dense_reference_attention(monkeypatch):
    m = _draft()
    ids, aux = _batch(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    real = list(m.ttt_forward(ids, aux, mask, 4))
    monkeypatch.setattr(model_mod, "ttt_attention", lambda *a, causal=None, merge=None: dense_ttt_attention(*a))
    dense = list(m.ttt_forward(ids, aux, mask, 4))
    for a, b in zip(real, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_right_padding_does_not_change_real_positions():
    m = _draft()
    ids, aux = _batch(B=2, T=10)
    n = 6
    ids[1, n:] = 0
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, n:] = False
    padded = list(m.ttt_forward(ids, aux, mask, 3))
    alone = list(m.ttt_forward(ids[1:, :n], aux[1:, :n], mask[1:, :n], 3))
    for k, (a, b) in enumerate(zip(padded, alone, strict=True)):
        # step k at t reads x_{t+k+1}: only positions whose token lies inside the n real ones agree
        last = n - k - 1
        torch.testing.assert_close(a[1, :last], b[0, :last], rtol=1e-10, atol=1e-10)


def test_gradients_reach_trainable_weights_but_not_embedding():
    m = _draft().float().train()
    ids, aux = _batch(B=2, T=8)
    loss = sum(m.logits(h).logsumexp(-1).mean() for h in m.ttt_forward(ids, aux.float(), torch.ones(2, 8, dtype=torch.bool), 3))
    loss.backward()
    assert m.embed_tokens.weight.grad is None
    for key in EXPORT_KEYS:
        p = m.get_parameter(key)
        assert p.grad is not None and p.grad.abs().sum() > 0, key


# ------------------------------------------------------------------------------------ cached inference
def test_cached_token_by_token_reproduces_ttt_step0():
    m = _draft()
    T = 12
    ids, aux = _batch(T=T)
    steps = list(m.ttt_forward(ids, aux, torch.ones(1, T, dtype=torch.bool), 1))
    cache = DraftCache()
    fused = m.fuse(aux)
    for t in range(T - 1):  # step 0 at t reads x_{t+1}
        normed, _ = m.forward_cached(ids[:, t + 1 : t + 2], fused[:, t : t + 1], torch.tensor([[t]]), cache)
        torch.testing.assert_close(m.logits(normed[:, 0]), m.logits(steps[0][:, t]), rtol=1e-10, atol=1e-10)
    assert len(cache) == T - 1
    # a whole prefix at once gives the same as one by one
    normed_all, _ = m.forward_cached(ids[:, 1:], fused[:, :-1], torch.arange(T - 1)[None], DraftCache())
    torch.testing.assert_close(normed_all, steps[0][:, : T - 1], rtol=1e-10, atol=1e-10)


def test_chain_drafting_reproduces_ttt_steps_at_the_diagonal():
    m = _draft()
    T, K = 12, 4
    ids, aux = _batch(T=T)
    steps = list(m.ttt_forward(ids, aux, torch.ones(1, T, dtype=torch.bool), K))
    fused = m.fuse(aux)
    cache = DraftCache()
    for t in range(T - K):
        # prefill step 0 for every position up to t (keys of real tokens), then chain K-1 steps
        cache.crop(t)
        normed, out = m.forward_cached(ids[:, t + 1 : t + 2], fused[:, t : t + 1], torch.tensor([[t]]), cache)
        torch.testing.assert_close(normed[:, 0], steps[0][:, t], rtol=1e-10, atol=1e-10)
        for k in range(1, K):
            normed, out = m.forward_cached(ids[:, t + k + 1 : t + k + 2], out, torch.tensor([[t + k]]), cache)
            torch.testing.assert_close(normed[:, 0], steps[k][:, t], rtol=1e-10, atol=1e-10)
        assert len(cache) == t + K
    with pytest.raises(ValueError, match="holds"):
        cache.crop(100)


# ------------------------------------------------------------------------------------ export
def test_export_keys_and_config():
    m = _draft().float()
    sd = m.export_state_dict()
    assert list(sd) == list(EXPORT_KEYS)
    assert set(m.state_dict()) == set(EXPORT_KEYS) | {"embed_tokens.weight"}
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    cfg = m.export_config()
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    expect = {"num_hidden_layers": 1, "hidden_size": H, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "rope_scaling": None, "max_position_embeddings": 4096, "vocab_size": V, "draft_vocab_size": VD,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    assert {k: cfg[k] for k in expect} == expect
    # default aux layers: ids omitted; target_hidden_size == hidden_size: omitted
    assert not {"eagle_config", "eagle_aux_hidden_state_layer_ids", "target_hidden_size"} & set(cfg)
    json.dumps(cfg)


def test_export_writes_non_default_aux_ids_for_both_engines():
    m = _draft(aux=[1, 3, 6])
    cfg = m.export_config()
    # vLLM V1 reads the top-level key, HF numbering (captures the input of layer i)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
    # SGLang reads eagle_config and adds 1 (captures the output of layer id)
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 2, 5], "use_aux_hidden_state": True}
    assert hf_aux_layer_ids(cfg) == [1, 3, 6]
    # exports written before the top-level key: eagle_config only, in the chosen convention
    assert hf_aux_layer_ids({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 2, 5]}}) == [1, 3, 6]
    assert hf_aux_layer_ids({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 6]}}, "vllm") == [1, 3, 6]
    assert hf_aux_layer_ids(_draft().export_config()) is None


def test_export_writes_target_hidden_size_only_when_it_differs():
    # SafeAILab/EAGLE loads the target's embedding only without the key; engines default it to hidden_size
    assert "target_hidden_size" not in _draft().export_config()
    cfg = _draft().config
    cfg.target_hidden_size = 2 * cfg.hidden_size
    assert cfg.export_dict()["target_hidden_size"] == 2 * cfg.hidden_size
    assert DraftConfig.from_export(cfg.export_dict()).target_hidden_size == 2 * cfg.hidden_size


def test_from_export_round_trip_and_init_from(tmp_path):
    m = _draft().float()
    sd = m.export_state_dict()
    d2t = torch.arange(VD, dtype=torch.int64)
    save_file({**sd, "d2t": d2t, "t2d": torch.zeros(V, dtype=torch.bool)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(m.export_config()))

    back = LlamaEagle3Draft.from_export(tmp_path, embed_weight=m.embed_tokens.weight)
    assert torch.equal(back.d2t, d2t)
    ref = m  # with what survives a bf16 export
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    ids, aux = _batch(T=8)
    ones = torch.ones(1, 8, dtype=torch.bool)
    for a, b in zip(back.ttt_forward(ids, aux.float(), ones, 2), ref.ttt_forward(ids, aux.float(), ones, 2), strict=True):
        torch.testing.assert_close(back.logits(a), ref.logits(b))

    fresh = build_draft(LlamaEagle3Options(init_from=str(tmp_path)), _target(), VD)
    torch.testing.assert_close(fresh.fc.weight, ref.fc.weight)
    with pytest.raises(ValueError, match="lm_head.weight"):
        build_draft(LlamaEagle3Options(init_from=str(tmp_path)), _target(), VD * 2)


def test_sdpa_attention_option_matches_eager_on_real_positions():
    eager = _draft().float()
    fused = _draft(options=LlamaEagle3Options(attention="sdpa")).float()
    fused.load_state_dict(eager.state_dict())
    ids, aux = _batch(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    for a, b in zip(eager.ttt_forward(ids, aux.float(), mask, 3), fused.ttt_forward(ids, aux.float(), mask, 3),
                    strict=True):
        torch.testing.assert_close(a[mask], b[mask], rtol=1e-4, atol=1e-4)


def test_bf16_model_keeps_fp32_rope_frequencies():
    """``.to(bf16)`` (eval's ``from_export(dtype=bf16)``) must not round the RoPE frequencies: the
    rope of a bf16 draft at position 4,000 equals the fp32 draft's up to bf16 output rounding."""
    from specforge_llama_eagle3.model import cos_sin, inverse_frequencies

    m = build_draft(None, _target(), VD).to(torch.bfloat16)
    cfg = m.config
    want = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, want)
    pos = torch.tensor([4000])
    cos, sin = cos_sin(m.inv_freq, pos, torch.float32)
    ref_cos, ref_sin = cos_sin(want, pos, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # what the rounded frequencies would have given: angles off by radians
    bad_cos, _ = cos_sin(want.to(torch.bfloat16).float(), pos, torch.float32)
    assert (bad_cos - ref_cos).abs().max() > 0.1


def test_plugin_modules_import_no_circle():
    """The plugin's modules import each other as a tree (function-local imports included): the
    algorithm does not reach back into the registration module, nothing imports a benchmark."""
    import ast
    from pathlib import Path

    pkg = Path(model_mod.__file__).parent
    graph = {}
    for f in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n.split(".")[1] for n in names if n.startswith("specforge_llama_eagle3.")}
        graph[f.stem] = deps & {p.stem for p in pkg.glob("*.py")}
    assert "plugin" not in set().union(*graph.values())  # only the entry point imports plugin.py

    def visit(node, path):
        assert node not in path, f"import circle: {' -> '.join([*path, node])}"
        for dep in graph[node]:
            visit(dep, [*path, node])

    for name in graph:
        visit(name, [])
