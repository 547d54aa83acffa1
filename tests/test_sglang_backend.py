"""The ``sglang`` target backend against a STAND-IN for ``sgl.Engine`` (SGLang needs CUDA and its own
torch, so it cannot run here; ``tools/sglang_parity.py`` checks the real thing on a GPU machine).

The stand-in implements exactly the part of the SGLang API the plugin touches, and nothing more:

- ``Engine(**server_args)``, ``Engine.generate(input_ids=, sampling_params=, return_hidden_states=)``,
  ``Engine.shutdown()``; outputs shaped as SGLang returns them (a list of dicts whose
  ``meta_info["hidden_states"][0]`` is the prompt's rows as nested Python lists, from ``.tolist()``).
- Inside the "scheduler", an SGLang-style model around a real tiny HF model: it has SGLang's
  ``set_eagle3_layers_to_capture`` rule (``layers_to_capture = [v + 1 for v in layer_ids]``, capture
  = the stream entering that layer) and a stock-style ``logits_processor`` whose FULL capture stores
  ``torch.cat(aux_hidden_states, -1)``. The plugin's own ``install_capture`` is applied to it, as the
  external-model-package class does in SGLang.

Reference values come from transformers' ``output_hidden_states`` and logits, computed separately.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from specforge_sglang_backend import backend as backend_mod
from specforge_sglang_backend.backend import MODEL_PACKAGE, SglangTargetBackend, import_engine_class
from specforge_sglang_backend.options import SglangOptions
from transformers import AutoModelForCausalLM

from specforge_core.config.schema import SpecforgeConfig
from specforge_core.testing import make_tiny_model
from specforge_core.types import Sample

L = 8


# ------------------------------------------------------------------------------------ stand-in
class _Mode:
    def __init__(self, full: bool):
        self.full = full

    def is_full(self) -> bool:
        return self.full


class _LogitsMetadata:
    def __init__(self, full: bool):
        self.capture_hidden_mode = _Mode(full)


class _Out:
    def __init__(self, next_token_logits, hidden_states):
        self.next_token_logits = next_token_logits
        self.hidden_states = hidden_states


class StockLogitsProcessor(torch.nn.Module):
    """SGLang's LogitsProcessor, the part that matters: last-token logits and FULL hidden capture."""

    def forward(self, input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states=None):
        logits = self._get_logits(hidden_states[-1:], lm_head, logits_metadata)
        stored = None
        if logits_metadata.capture_hidden_mode.is_full():
            stored = torch.cat(aux_hidden_states, dim=-1) if aux_hidden_states is not None else hidden_states
        return _Out(logits, stored)

    def _get_logits(self, hidden_states, lm_head, logits_metadata):
        return hidden_states @ lm_head.weight.T


class StandInSglangModel(torch.nn.Module):
    """An SGLang ``*ForCausalLM`` around a real HF model (same capture rule as sglang's llama.py)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        self.lm_head = hf_model.get_output_embeddings()
        self.logits_processor = StockLogitsProcessor()
        self.capture_aux_hidden_states = False
        self.layers_to_capture: list[int] = []

    def set_eagle3_layers_to_capture(self, layer_ids=None):
        self.capture_aux_hidden_states = True
        n = self.hf.config.num_hidden_layers
        self.layers_to_capture = [2, n // 2, n - 3] if layer_ids is None else [v + 1 for v in layer_ids]

    @torch.no_grad()
    def forward(self, input_ids, return_hidden_states: bool):
        hs = self.hf.model(input_ids=input_ids[None], output_hidden_states=True).hidden_states
        # "if i in layers_to_capture: aux.append(hidden_states + residual)" before layer i runs
        aux = [hs[i][0] for i in self.layers_to_capture] if self.capture_aux_hidden_states else None
        final = hs[-1][0]  # after the final norm
        return self.logits_processor(input_ids, final, self.lm_head, _LogitsMetadata(return_hidden_states), aux)


class StandInEngine:
    """``sgl.Engine`` as the plugin uses it (see the module docstring)."""

    instances: list[StandInEngine] = []

    def __init__(self, **server_args):
        import json
        import os

        self.server_args = server_args
        self.shut = False
        # What SGLang's scheduler process would see: the inherited environment.
        assert os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] == MODEL_PACKAGE
        spec = json.loads(os.environ[backend_mod.CAPTURE_ENV])
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[server_args["dtype"]]
        hf = AutoModelForCausalLM.from_pretrained(server_args["model_path"], dtype=dtype).eval()
        if os.environ.get("STANDIN_SKIP_CAPTURE") == "1":
            self.model = StandInSglangModel(hf)  # as if another model package served the target
        else:
            # SGLang resolves the architecture to the external package's class and instantiates it.
            from specforge_sglang_backend.sgl_models.capture_models import _capture_class

            self.model = _capture_class(StandInSglangModel, spec)(hf)
        StandInEngine.instances.append(self)

    def generate(self, input_ids=None, sampling_params=None, return_hidden_states=False):
        assert sampling_params["max_new_tokens"] in (0, 1)
        outs = []
        for ids in input_ids:
            res = self.model(torch.tensor(ids), return_hidden_states)
            meta = {"id": f"r{len(outs)}", "prompt_tokens": len(ids), "completion_tokens": 1,
                    "finish_reason": {"type": "length", "length": 1}}
            if return_hidden_states and self.server_args.get("enable_return_hidden_states"):
                meta["hidden_states"] = [res.hidden_states[: len(ids)].cpu().clone().tolist()]
            outs.append({"output_ids": [int(res.next_token_logits[-1].argmax())], "meta_info": meta})
        return outs

    def shutdown(self):
        self.shut = True


class SlowEngine:
    def __init__(self, **kw):
        time.sleep(5)


# -------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgl")
    out = {}
    for i, (family, tied) in enumerate([("llama", False), ("qwen3", True)]):
        path = root / f"{family}-{tied}"
        make_tiny_model(path, family, tie_word_embeddings=tied, seed=30 + i)
        out[family] = str(path)
    return out


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("SGLANG_EXTERNAL_MODEL_PACKAGE", raising=False)
    monkeypatch.delenv(backend_mod.CAPTURE_ENV, raising=False)
    monkeypatch.delenv("STANDIN_SKIP_CAPTURE", raising=False)


def make_config(path, *, aux_layers=(), dtype="fp32"):
    c = SpecforgeConfig()
    c.model.target = path
    c.model.aux_layers = list(aux_layers)
    c.inference.backend = "sglang"
    c.inference.dtype = dtype
    return c


def samples(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 5 + 4 * i
        ids = torch.randint(3, 512, (T,), generator=g)
        out.append(Sample(f"s{i}", ids, (torch.arange(T) % 2).to(torch.uint8), category="chat"))
    return out


def reference(path, sample, aux_layers, dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        out = m(input_ids=sample.input_ids[None], output_hidden_states=True)
    hs = out.hidden_states
    return torch.cat([hs[i][0] for i in aux_layers], -1), hs[-1][0], out.logits[0].argmax(-1)


def backend(path, monkeypatch, chunk=3, **kw):
    monkeypatch.setattr(backend_mod, "ARGMAX_CHUNK", chunk)  # several lm_head chunks per prompt
    return SglangTargetBackend(SglangOptions(tp_size=1), make_config(path, **kw), "cuda:0", engine_cls=StandInEngine)


# ---------------------------------------------------------------------------------------- tests
def test_importing_plugin_never_imports_sglang():
    code = (
        "import sys, specforge_core, specforge_sglang_backend.plugin, specforge_sglang_backend.backend, "
        "specforge_sglang_backend.options, specforge_sglang_backend.capture\n"
        "from specforge_core.registry import get_registry\n"
        "assert 'sglang' in get_registry().names('target_backend')\n"
        "assert not any(m == 'sglang' or m.startswith('sglang.') for m in sys.modules), 'sglang imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_sglang_says_how_to_install():
    pytest.importorskip("torch")
    try:
        import sglang  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"specforge-train\[sglang\]"):
            import_engine_class()
    else:  # pragma: no cover - only on a machine with SGLang
        pytest.skip("sglang is installed here")


@pytest.mark.parametrize("family,aux_layers", [("llama", ()), ("qwen3", (1, 4, 7))])
def test_features_match_hf_hidden_states(model_dirs, monkeypatch, family, aux_layers):
    path = model_dirs[family]
    b = backend(path, monkeypatch, aux_layers=aux_layers)
    want_layers = list(aux_layers) or [2, L // 2, L - 3]
    assert b.info.aux_layer_ids == want_layers
    ss = samples()
    feats = b.generate(ss)
    assert [f.sample_id for f in feats] == [s.sample_id for s in ss]
    for s, f in zip(ss, feats, strict=True):
        aux, final, argmax = reference(path, s, want_layers)
        T = s.num_tokens
        assert f.aux_hidden.shape == (T, 3 * 64) and f.final_hidden.shape == (T, 64)
        torch.testing.assert_close(f.aux_hidden, aux, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.final_hidden, final, atol=1e-5, rtol=1e-5)
        assert torch.equal(f.target_argmax, argmax) and f.target_argmax.dtype == torch.int64
        assert torch.equal(f.input_ids, s.input_ids) and torch.equal(f.loss_mask, s.loss_mask)
        assert f.category == "chat"
    eng = b.engine
    b.close()
    assert eng.shut and b.engine is None


def test_layer_offset_is_sglang_minus_one(model_dirs, monkeypatch):
    """The captured stream is HF hidden_states[i], not [i+1] (SGLang adds 1 to the ids it is given)."""
    path = model_dirs["llama"]
    b = backend(path, monkeypatch, aux_layers=(2, 3, 5))
    assert b.engine.model.layers_to_capture == [2, 3, 5]
    s = samples(1)[0]
    f = b.generate([s])[0]
    _, _, _ = reference(path, s, [2, 3, 5])
    shifted, _, _ = reference(path, s, [3, 4, 6])
    assert not torch.allclose(f.aux_hidden, shifted, atol=1e-3)


def test_bf16_engine(model_dirs, monkeypatch):
    path = model_dirs["qwen3"]
    b = backend(path, monkeypatch, dtype="bf16")
    assert b.engine.server_args["dtype"] == "bfloat16"
    s = samples(2)[1]
    f = b.generate([s])[0]
    aux, final, argmax = reference(path, s, b.info.aux_layer_ids, torch.bfloat16)
    assert f.aux_hidden.dtype == torch.bfloat16 and f.final_hidden.dtype == torch.bfloat16
    # the stand-in runs the same bf16 model: the rows must survive .tolist() bit-exactly
    assert torch.equal(f.aux_hidden, aux) and torch.equal(f.final_hidden, final)
    assert torch.equal(f.target_argmax, argmax)


def test_engine_gets_capture_invariants(model_dirs, monkeypatch):
    b = backend(model_dirs["llama"], monkeypatch)
    sa = b.engine.server_args
    assert sa["disable_radix_cache"] and sa["chunked_prefill_size"] == -1 and sa["enable_return_hidden_states"]
    assert sa["skip_tokenizer_init"] and sa["tp_size"] == 1 and sa["base_gpu_id"] == 0
    assert sa["dist_init_addr"].startswith("127.0.0.1:") and sa["port"] != sa["nccl_port"]


def test_wrong_row_width_is_a_clear_error(model_dirs, monkeypatch):
    monkeypatch.setenv("STANDIN_SKIP_CAPTURE", "1")  # as if another model package served the target
    b = backend(model_dirs["llama"], monkeypatch)
    with pytest.raises(ValueError, match=r"expected \[T, 259\].*SGLANG_EXTERNAL_MODEL_PACKAGE"):
        b.generate(samples(1))


def test_foreign_external_model_package_is_refused(model_dirs, monkeypatch):
    monkeypatch.setenv("SGLANG_EXTERNAL_MODEL_PACKAGE", "someone_else.models")
    with pytest.raises(ValueError, match="SGLANG_EXTERNAL_MODEL_PACKAGE"):
        backend(model_dirs["llama"], monkeypatch)


def test_bad_samples_and_empty_batch(model_dirs, monkeypatch):
    b = backend(model_dirs["llama"], monkeypatch)
    assert b.generate([]) == []
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        b.generate([Sample("x", torch.tensor([1, 600]), torch.tensor([0, 1], dtype=torch.uint8))])


def test_init_timeout(model_dirs):
    opts = SglangOptions(tp_size=1, init_timeout=1)
    with pytest.raises(TimeoutError, match="init_timeout = 1"):
        SglangTargetBackend(opts, make_config(model_dirs["llama"]), None, engine_cls=SlowEngine)


def test_topology_checked_before_start(model_dirs):
    with pytest.raises(ValueError, match="tp_size = 8"):
        SglangTargetBackend(SglangOptions(), make_config(model_dirs["llama"]), None, engine_cls=StandInEngine)


def test_multinode_needs_address(model_dirs):
    c = make_config(model_dirs["llama"])
    with pytest.raises(ValueError, match="dist_init_addr"):
        SglangTargetBackend(SglangOptions(tp_size=2, nnodes=2), c, None, engine_cls=StandInEngine)


def test_entry_classes_empty_outside_specforge():
    from specforge_sglang_backend.sgl_models import capture_models

    assert capture_models._entry_classes() == []
    cls = capture_models._capture_class(StandInSglangModel, {"aux_layers": [2], "vocab_size": 512, "argmax_chunk": 4})
    assert cls.__name__ == "StandInSglangModel" and issubclass(cls, StandInSglangModel)


def _parity_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "sglang_parity.py"
    spec = importlib.util.spec_from_file_location("sglang_parity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parity_tool_compare_against_hf_backend(model_dirs, monkeypatch, capsys):
    """tools/sglang_parity.py's comparison: the (stand-in) sglang backend vs the real hf backend."""
    from specforge_hf_backend.backend import HFTargetBackend
    from specforge_hf_backend.options import HFBackendOptions

    tool = _parity_tool()
    path = model_dirs["llama"]
    ss = samples(2)
    sgl = backend(path, monkeypatch).generate(ss)
    cfg = make_config(path)
    cfg.inference.backend = "hf"
    hf = HFTargetBackend(HFBackendOptions(device="cpu"), cfg).generate(ss)
    rows = tool.compare(sgl, hf, 3, rel_tol=1e-4, argmax_min=1.0)
    assert [r["tensor"] for r in rows] == ["aux[0]", "aux[1]", "aux[2]", "final", "argmax"]
    assert all(r["ok"] for r in rows), rows
    tool.print_table(rows, [2, 4, 5])
    assert "aux[0] L2" in capsys.readouterr().out

    # An off-by-one layer mapping must fail the table.
    shifted = backend(path, monkeypatch, aux_layers=(3, 5, 6)).generate(ss)
    bad = tool.compare(shifted, hf, 3, rel_tol=1e-4, argmax_min=1.0)
    assert [r["ok"] for r in bad] == [False, False, False, True, True]
