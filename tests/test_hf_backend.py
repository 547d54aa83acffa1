"""The ``hf`` target backend on real tiny llama/qwen2/qwen3 models, checked against transformers'
own ``output_hidden_states`` / logits computed separately."""

from __future__ import annotations

import functools
import os

import pytest
import specforge_hf_backend.plugin as hf_plugin
import torch
from specforge_hf_backend.backend import HFTargetBackend, capture_hidden_states
from specforge_hf_backend.options import HFBackendOptions
from transformers import AutoModelForCausalLM

from specforge_core.config.schema import SpecforgeConfig
from specforge_core.registry import Registry
from specforge_core.testing import make_tiny_model
from specforge_core.types import Sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")

L = 8
CASES = [("llama", False), ("qwen2", True), ("qwen3", False), ("qwen3", True)]
CASE_IDS = [f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfb")
    out = {}
    for i, (family, tied) in enumerate(CASES):
        path = root / f"{family}-{tied}"
        make_tiny_model(path, family, tie_word_embeddings=tied, seed=10 + i)
        out[(family, tied)] = str(path)
    return out


def make_config(path: str, *, aux_layers=(), batch_size: int = 4, dtype: str = "fp32") -> SpecforgeConfig:
    cfg = SpecforgeConfig()
    cfg.model.target = path
    cfg.model.aux_layers = list(aux_layers)
    cfg.inference.batch_size = batch_size
    cfg.inference.dtype = dtype
    return cfg


def make_samples(lengths, vocab=512, seed=0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(
            sample_id=f"s{i}",
            input_ids=torch.randint(3, vocab, (n,), generator=g),
            loss_mask=(torch.rand(n, generator=g) > 0.4).to(torch.uint8),
            category="chat" if i % 2 else None,
        )
        for i, n in enumerate(lengths)
    ]


@functools.lru_cache(maxsize=4)
def load_reference(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def reference(path: str, sample: Sample):
    """transformers' own view of one unpadded sample: all hidden states and full logits."""
    model = load_reference(path)
    with torch.no_grad():
        out = model(sample.input_ids[None], output_hidden_states=True)
    return [h[0] for h in out.hidden_states], out.logits[0]


# ------------------------------------------------------------------------------ layer conventions
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hooks_equal_output_hidden_states_and_final_is_post_norm(model_dirs, case):
    """Pins, for this transformers version and family: hooks on layer i-1 give exactly
    hidden_states[i]; hidden_states[L] is the final norm applied to layer L-1's output, and equals
    last_hidden_state."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs[case], dtype=torch.float32).eval()
    base = model.get_decoder()
    ids = make_samples([21])[0].input_ids[None]
    pre_norm = {}
    h = base.layers[L - 1].register_forward_hook(lambda m, a, o: pre_norm.setdefault("x", o))
    try:
        with torch.no_grad(), capture_hidden_states(base.layers, [1, 2, 4, 5, 7]) as cap:
            out = model(ids, output_hidden_states=True)
    finally:
        h.remove()
    hs = out.hidden_states
    assert len(hs) == L + 1
    for i in [1, 2, 4, 5, 7]:
        assert torch.equal(cap[i], hs[i]), i
    assert not torch.equal(cap[2], hs[3])  # off-by-one would be caught
    pre = pre_norm["x"][0] if isinstance(pre_norm["x"], tuple) else pre_norm["x"]
    assert torch.equal(hs[L], base.norm(pre))
    assert not torch.allclose(hs[L], pre, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, hs[L])
    # and the logits are the lm_head of that post-norm state
    assert torch.allclose(out.logits, model.lm_head(hs[L]), atol=1e-5)


# --------------------------------------------------------------------------------- features
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_features_match_transformers(model_dirs, case):
    path = model_dirs[case]
    backend = HFTargetBackend(HFBackendOptions(), make_config(path), device="cpu")
    samples = make_samples([17, 5, 30], seed=1)
    feats = backend.generate(samples)
    info = backend.info
    assert info.aux_layer_ids == [2, 4, 5] and info.hidden_size == 64 and info.vocab_size == 512
    assert [f.sample_id for f in feats] == ["s0", "s1", "s2"]
    for s, f in zip(samples, feats, strict=True):
        T = s.num_tokens
        hs, logits = reference(path, s)
        assert f.aux_hidden.shape == (T, 3 * 64) and f.final_hidden.shape == (T, 64)
        assert f.aux_hidden.dtype == f.final_hidden.dtype == torch.float32
        assert f.input_ids.dtype == torch.int64 and torch.equal(f.input_ids, s.input_ids)
        assert f.loss_mask.dtype == torch.uint8 and torch.equal(f.loss_mask, s.loss_mask)
        assert f.target_argmax.dtype == torch.int64 and f.target_argmax.shape == (T,)
        assert f.category == s.category
        ref_aux = torch.cat([hs[2], hs[4], hs[5]], dim=-1)  # low -> high
        torch.testing.assert_close(f.aux_hidden, ref_aux, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(f.final_hidden, hs[L], atol=2e-5, rtol=1e-5)
        assert torch.equal(f.target_argmax, logits.argmax(-1))
        # each feature owns its storage (a view would drag the whole batch through pickling)
        assert f.aux_hidden.untyped_storage().nbytes() == f.aux_hidden.numel() * 4
    backend.close()


def test_batched_with_padding_equals_one_by_one(model_dirs):
    path = model_dirs[("qwen3", False)]
    samples = make_samples([9, 33, 1, 20, 14], seed=2)
    batched = HFTargetBackend(HFBackendOptions(), make_config(path, batch_size=5), "cpu").generate(samples)
    single = HFTargetBackend(HFBackendOptions(), make_config(path, batch_size=1), "cpu").generate(samples)
    for a, b in zip(batched, single, strict=True):
        assert a.num_tokens == b.num_tokens
        torch.testing.assert_close(a.aux_hidden, b.aux_hidden, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(a.final_hidden, b.final_hidden, atol=2e-5, rtol=1e-5)
        assert torch.equal(a.target_argmax, b.target_argmax)


def test_argmax_chunking_and_custom_aux_layers(model_dirs):
    path = model_dirs[("llama", False)]
    s = make_samples([25], seed=3)
    hs, logits = reference(path, s[0])
    opts = HFBackendOptions(argmax_chunk_size=4)  # 25 tokens -> 7 chunks, last one partial
    f = HFTargetBackend(opts, make_config(path, aux_layers=[1, 3, 6, 7]), "cpu").generate(s)[0]
    assert f.aux_hidden.shape == (25, 4 * 64)
    torch.testing.assert_close(f.aux_hidden, torch.cat([hs[1], hs[3], hs[6], hs[7]], -1), atol=2e-5, rtol=1e-5)
    assert torch.equal(f.target_argmax, logits.argmax(-1))


def test_bf16_compute_dtype(model_dirs):
    path = model_dirs[("qwen2", True)]
    f = HFTargetBackend(HFBackendOptions(), make_config(path, dtype="bf16"), "cpu").generate(make_samples([7]))[0]
    assert f.aux_hidden.dtype == f.final_hidden.dtype == torch.bfloat16
    assert f.target_argmax.dtype == torch.int64 and f.input_ids.dtype == torch.int64


def test_sharded_checkpoint_loads(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    make_tiny_model(single, "qwen3", seed=5)
    make_tiny_model(sharded, "qwen3", seed=5, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    samples = make_samples([12, 6])
    a = HFTargetBackend(HFBackendOptions(), make_config(str(single)), "cpu").generate(samples)
    b = HFTargetBackend(HFBackendOptions(), make_config(str(sharded)), "cpu").generate(samples)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.aux_hidden, y.aux_hidden) and torch.equal(x.target_argmax, y.target_argmax)


def test_errors(tmp_path):
    make_tiny_model(tmp_path, "llama", max_position_embeddings=32)
    backend = HFTargetBackend(HFBackendOptions(), make_config(str(tmp_path)), "cpu")
    with pytest.raises(ValueError, match=r"s0.*40 tokens.*max_position_embeddings = 32"):
        backend.generate(make_samples([40]))
    bad = Sample("x", torch.tensor([1, 2, 600]), torch.ones(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"'x'.*\[0, 512\)"):
        backend.generate([bad])
    bad = Sample("y", torch.tensor([1, 2, 3]), torch.ones(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="loss_mask shape"):
        backend.generate([bad])
    with pytest.raises(ValueError, match=r"model\.aux_layers.*\[9\]"):
        HFTargetBackend(HFBackendOptions(), make_config(str(tmp_path), aux_layers=[2, 9]), "cpu")


def test_registered_through_plugin_hook(model_dirs):
    reg = Registry()
    reg.register_plugin(hf_plugin, "hf-backend")
    comp = reg.get("target_backend", "hf")
    assert comp.config_class is HFBackendOptions
    cfg = make_config(model_dirs[("qwen3", True)])
    cfg.inference.backend = "hf"  # this registry holds no plugin declaring defaults (register_defaults)
    backend = reg.create_for(cfg, "target_backend", cfg, None)  # options None -> defaults, device auto
    assert isinstance(backend, HFTargetBackend) and backend.device.type in ("cpu", "cuda")
    assert backend.generate(make_samples([4]))[0].aux_hidden.shape == (4, 192)
