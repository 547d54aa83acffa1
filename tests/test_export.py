"""The exported draft: exactly the keys, shapes, dtypes and config fields serving engines read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from specforge_core.config import load_config
from specforge_core.export import export_draft
from specforge_core.target import target_info, with_aux_layers
from specforge_core.training.components import create
from specforge_core.vocab import VocabMapping

H, INTER, HEADS, KV, HD, V, VD = 64, 128, 4, 2, 16, 512, 96


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    from specforge_core.testing import make_tiny_model

    path = tmp_path_factory.mktemp("target")
    make_tiny_model(path, vocab_size=V)
    return path


@pytest.fixture
def draft_and_vocab(target_dir):
    cfg = load_config(data={"model": {"target": str(target_dir), "draft_vocab_size": VD}})
    info = target_info(str(target_dir), with_aux_layers(cfg).model.aux_layers)
    used = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:VD]
    vocab = VocabMapping.from_target_ids(used, V)
    torch.manual_seed(0)
    algorithm = create(cfg, "draft_algorithm", cfg)
    draft = algorithm.build(info, vocab)
    draft.specforge_algorithm = algorithm  # what the trainer tags its draft with (export_draft finds it)
    return draft, vocab


EXPECTED = {
    "fc.weight": ((H, 3 * H), torch.bfloat16),
    "midlayer.hidden_norm.weight": ((H,), torch.bfloat16),
    "midlayer.input_layernorm.weight": ((H,), torch.bfloat16),
    "midlayer.post_attention_layernorm.weight": ((H,), torch.bfloat16),
    "midlayer.self_attn.q_proj.weight": ((HEADS * HD, 2 * H), torch.bfloat16),
    "midlayer.self_attn.k_proj.weight": ((KV * HD, 2 * H), torch.bfloat16),
    "midlayer.self_attn.v_proj.weight": ((KV * HD, 2 * H), torch.bfloat16),
    "midlayer.self_attn.o_proj.weight": ((H, HEADS * HD), torch.bfloat16),
    "midlayer.mlp.gate_proj.weight": ((INTER, H), torch.bfloat16),
    "midlayer.mlp.up_proj.weight": ((INTER, H), torch.bfloat16),
    "midlayer.mlp.down_proj.weight": ((H, INTER), torch.bfloat16),
    "norm.weight": ((H,), torch.bfloat16),
    "lm_head.weight": ((VD, H), torch.bfloat16),
    "d2t": ((VD,), torch.int64),
    "t2d": ((V,), torch.bool),
}


def test_export_keys_shapes_dtypes_and_config(tmp_path, draft_and_vocab, target_dir):
    draft, vocab = draft_and_vocab
    out = export_draft(draft, vocab, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: (tuple(t.shape), t.dtype) for k, t in got.items()} == EXPECTED
    # d2t/t2d are the mapping itself; target id of draft id i is i + d2t[i]
    assert torch.equal(got["d2t"], vocab.d2t) and torch.equal(got["t2d"], vocab.t2d)
    assert torch.equal(torch.arange(VD) + got["d2t"], vocab.t2d.nonzero().squeeze(1))
    # weights are the draft's, rounded to bf16
    sd = draft.export_state_dict()
    assert torch.equal(got["fc.weight"], sd["fc.weight"].detach().to(torch.bfloat16))

    cfg = json.loads((out / "config.json").read_text())
    target_cfg = json.loads((target_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1
    assert cfg["vocab_size"] == V
    assert cfg["draft_vocab_size"] == VD
    assert cfg["hidden_size"] == H and cfg["intermediate_size"] == INTER
    assert cfg["num_attention_heads"] == HEADS and cfg["num_key_value_heads"] == KV
    # written out explicitly, equal to the target's (loaders silently default missing ones)
    assert cfg["rms_norm_eps"] == target_cfg.get("rms_norm_eps", 1e-5) == 1e-5
    rope = target_cfg.get("rope_theta") or target_cfg["rope_parameters"]["rope_theta"]
    assert cfg["rope_theta"] == rope


def test_export_loads_back_and_replaces_atomically(tmp_path, draft_and_vocab):
    from specforge_llama_eagle3.model import LlamaEagle3Draft

    draft, vocab = draft_and_vocab
    out = export_draft(draft, vocab, tmp_path / "export")
    with torch.no_grad():
        draft.lm_head.weight.add_(1.0)
    export_draft(draft, vocab, out)  # over an existing export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dirs left behind
    loaded = LlamaEagle3Draft.from_export(out)
    want = {k: v.detach().to(torch.bfloat16) for k, v in draft.export_state_dict().items()}
    got = loaded.export_state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k].to(torch.bfloat16), want[k], rtol=0, atol=0)


def test_export_rejects_vocab_mismatch(tmp_path, draft_and_vocab):
    draft, _ = draft_and_vocab
    wrong = VocabMapping.from_target_ids(torch.arange(VD - 1), V)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        export_draft(draft, wrong, tmp_path / "export")
    assert not (tmp_path / "export").exists()
