"""EAGLE-3.1 (``model.llama-eagle3.fc_norm``): each aux hidden state RMS-normed with its own weight
before fc, in training (the TTT fast path), in the export (vLLM's ``fc_norm`` layout) and when an
export is read back for eval. Reference: a plain draft without fc_norm fed the normed features."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from specforge_llama_eagle3.algorithm import make_llama_eagle3
from specforge_llama_eagle3.model import LlamaEagle3Draft
from specforge_llama_eagle3.plugin import LlamaEagle3Options

from specforge_core.types import TargetInfo
from specforge_core.vocab import VocabMapping

TINY = Path(__file__).resolve().parents[1] / "configs" / "assets" / "tiny-target"


def _build(fc_norm: bool, seed: int = 0):
    hf = json.loads((TINY / "config.json").read_text())
    torch.manual_seed(seed)
    info = TargetInfo(model_path=str(TINY), hf_config=hf, aux_layer_ids=[2, 4, 5], hidden_size=hf["hidden_size"],
                      vocab_size=hf["vocab_size"], num_hidden_layers=hf["num_hidden_layers"])
    vocab = VocabMapping.from_target_ids(torch.arange(0, hf["vocab_size"], 2), hf["vocab_size"])
    alg = make_llama_eagle3(LlamaEagle3Options(fc_norm=fc_norm, attention="eager", compile="off"))
    return alg, alg.build(info, vocab), vocab


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def eagle31_export(tmp_path: Path):
    """An exported EAGLE-3.1 draft with distinct, non-trivial fc_norm weights; returns (dir, weights)."""
    from specforge_core.export import write_export

    alg, draft, vocab = _build(True)
    with torch.no_grad():
        for i, n in enumerate(draft.fc_norm):
            n.weight.copy_(torch.linspace(0.5, 1.5, n.weight.numel()) * (i + 1))
    config, tensors = alg.export(draft, vocab)
    return write_export(config, tensors, tmp_path / "eagle31"), [n.weight.detach().clone() for n in draft.fc_norm]


def test_fc_norm_in_training_forward_equals_normed_features():
    _, d31, _ = _build(True)
    _, plain, _ = _build(False)
    missing, unexpected = plain.load_state_dict(d31.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == [f"fc_norm.{i}.weight" for i in range(3)]
    with torch.no_grad():
        for i, n in enumerate(d31.fc_norm):
            n.weight.copy_(torch.rand(n.weight.shape) + 0.5 * i)
    H, eps = d31.config.target_hidden_size, d31.config.rms_norm_eps
    aux = torch.randn(2, 9, 3 * H) * torch.tensor([0.1, 3.0, 30.0]).repeat_interleave(H)  # very different scales
    ids = torch.randint(0, 500, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    normed = torch.cat([_rms(c, n.weight, eps) for c, n in zip(aux.chunk(3, -1), d31.fc_norm, strict=True)], -1)
    with torch.no_grad():
        got = list(d31.ttt_forward(ids, aux, mask, 3))
        want = list(plain.ttt_forward(ids, normed, mask, 3))
        without = list(plain.ttt_forward(ids, aux, mask, 3))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], without[0], atol=1e-3)  # the norms do change the draft
    torch.testing.assert_close(d31.fuse(aux), plain.fuse(normed), rtol=1e-5, atol=1e-5)


def test_fc_norm_export_layout_and_roundtrip(tmp_path):
    export, weights = eagle31_export(tmp_path)
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["fc_norm"] is True and cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    from safetensors.torch import load_file

    tensors = load_file(str(export / "model.safetensors"))
    assert {f"fc_norm.{i}.weight" for i in range(3)} <= set(tensors)
    back = LlamaEagle3Draft.from_export(export)
    assert back.fc_norm is not None
    for n, w in zip(back.fc_norm, weights, strict=True):
        torch.testing.assert_close(n.weight, w.to(torch.bfloat16).float())
    _, plain, vocab = _build(False)
    config, _ = make_llama_eagle3(LlamaEagle3Options()).export(plain, vocab)
    assert "fc_norm" not in config  # plain EAGLE-3 exports are unchanged
