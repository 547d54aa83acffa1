"""The ``vllm`` target backend against the real vLLM (CPU build, its own venv).

Its features (aux hidden states, final post-norm hidden state, full-vocab argmax) must equal the
``hf`` backend's on the same model and samples, with the default and with non-default aux layers;
the quickstart must train to the same per-step losses with either backend, in the local and in
the Ray pipeline. Skipped when no vLLM environment is found (``nox -s vllm`` builds one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from specforge_core.config import load_config
from specforge_core.types import Sample

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "configs" / "assets" / "tiny-target"
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def _vllm_python() -> str:
    from specforge_vllm.backend import find_python

    try:
        return find_python("")
    except FileNotFoundError as exc:
        return pytest.skip(f"no vLLM environment: {exc}", allow_module_level=True)


pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PYTHON = _vllm_python()


def _config(aux_layers: list[int], *overrides: str):
    return load_config([QUICKSTART], [f"model.target={TARGET}", f"model.aux_layers={json.dumps(aux_layers)}",
                                      "inference.batch_size=5", *overrides])


def _samples(n: int = 11, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 2048, *torch.randint(3, 400, (n - 3,), generator=g).tolist()]  # edges + random
    return [Sample(f"s{i}", torch.randint(0, 1856, (t,), generator=g),
                   (torch.rand(t, generator=g) > 0.5).to(torch.uint8), category=f"c{i % 2}")
            for i, t in enumerate(lengths)]


def _pair(aux_layers: list[int]):
    from specforge_hf_backend.backend import HFTargetBackend
    from specforge_hf_backend.options import HFBackendOptions
    from specforge_vllm.backend import VLLMTargetBackend

    cfg = _config(aux_layers, "inference.backend=vllm", f"inference.vllm.python={PYTHON}")
    return HFTargetBackend(HFBackendOptions(), cfg, "cpu"), VLLMTargetBackend(cfg.options("inference", "vllm"), cfg, "cpu")


@pytest.fixture(scope="module", params=[[], [1, 3, 6]], ids=["default-aux", "aux-1-3-6"])
def backends(request):
    hf, vllm = _pair(request.param)
    yield hf, vllm
    vllm.close()
    hf.close()


def test_features_equal_hf(backends):
    hf, vllm = backends
    assert vllm.info.aux_layer_ids == hf.info.aux_layer_ids
    samples = _samples()
    want, got = hf.generate(samples), vllm.generate(samples)
    assert [f.sample_id for f in got] == [s.sample_id for s in samples]  # in the order given
    for w, g in zip(want, got, strict=True):
        assert g.category == w.category
        assert torch.equal(g.input_ids, w.input_ids) and torch.equal(g.loss_mask, w.loss_mask)
        for key in ("aux_hidden", "final_hidden"):
            a, b = getattr(w, key), getattr(g, key)
            assert b.dtype == a.dtype == torch.float32 and b.shape == a.shape and b.is_contiguous()
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"{w.sample_id} {key}")
        assert g.target_argmax.dtype == torch.int64
        assert torch.equal(g.target_argmax, w.target_argmax), w.sample_id
    # A wrong layer would not pass: neighbouring layers' states differ by far more than the tolerance.
    H = hf.info.hidden_size
    assert (got[3].aux_hidden[:, :H] - want[3].aux_hidden[:, H : 2 * H]).abs().max() > 1e-2


def test_bad_samples_fail_before_vllm_and_it_stays_usable(backends):
    _, vllm = backends
    too_long = Sample("long", torch.zeros(2049, dtype=torch.int64), torch.ones(2049, dtype=torch.uint8))
    with pytest.raises(ValueError, match="'long' has 2049 tokens"):
        vllm.generate([too_long])
    bad_id = Sample("oov", torch.tensor([1, 5000]), torch.ones(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="'oov'.*vocab_size"):
        vllm.generate([bad_id])
    assert vllm.generate(_samples(4, seed=1))[3].num_tokens > 0
    assert not [f for f in os.listdir(vllm.workdir) if f.endswith(".safetensors")]  # nothing left behind


def _chat_prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TARGET)
    questions = ["What is 2 plus 3?", "Write the number 6 in words.", "Hello", "Name a color."]
    out = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def test_generate_text_greedy_equals_transformers_and_features_survive(backends):
    from specforge_core.components import GenerationParams

    hf, vllm = backends
    if hf.info.aux_layer_ids != [2, 4, 5]:
        pytest.skip("generation does not depend on the aux layers: checked once, with the default ones")
    prompts = _chat_prompts()
    got = vllm.generate_text(prompts, GenerationParams(max_new_tokens=40))
    eos = hf.model.config.eos_token_id
    for p, g in zip(prompts, got, strict=True):
        ref = hf.model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, pad_token_id=0)[0, len(p):]
        assert g.token_ids == ref.tolist()
        assert g.finish_reason == ("stop" if ref[-1] == eos else "length")
    # a stop string ends the text before it; the token that completed it is the last one kept
    stop = got[0].text[3:6]
    cut = vllm.generate_text(prompts[:1], GenerationParams(max_new_tokens=40, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == got[0].text[:3] and cut.token_ids == got[0].token_ids[:len(cut.token_ids)]
    short = vllm.generate_text(prompts[:1], GenerationParams(max_new_tokens=2))[0]
    assert short.finish_reason == "length" and short.token_ids == got[0].token_ids[:2]
    # the capture engine comes back for features, which still equal hf's
    samples = _samples(5, seed=2)
    for w, g in zip(hf.generate(samples), vllm.generate(samples), strict=True):
        torch.testing.assert_close(g.aux_hidden, w.aux_hidden, rtol=1e-4, atol=1e-4)
        assert torch.equal(g.target_argmax, w.target_argmax)


def test_generate_text_samples_the_target_distribution(backends):
    from specforge_core.components import GenerationParams

    hf, vllm = backends
    if hf.info.aux_layer_ids != [2, 4, 5]:
        pytest.skip("generation does not depend on the aux layers: checked once, with the default ones")
    prompt = _chat_prompts()[3]  # its first answer token is open: p_max 0.35 at temperature 1
    n, temp = 400, 1.0
    with torch.no_grad():
        logits = hf.model(torch.tensor([prompt])).logits[0, -1]
    probs = torch.softmax(logits / temp, -1)
    counts = torch.zeros_like(probs)
    for seed in range(n):  # one request per seed: the same seed gives the same token
        tok = vllm.generate_text([prompt], GenerationParams(temperature=temp, max_new_tokens=1, seed=seed))[0]
        counts[tok.token_ids[0]] += 1
    again = vllm.generate_text([prompt], GenerationParams(temperature=temp, max_new_tokens=1, seed=7))[0]
    first = vllm.generate_text([prompt], GenerationParams(temperature=temp, max_new_tokens=1, seed=7))[0]
    assert again.token_ids == first.token_ids
    tv = 0.5 * (counts / n - probs).abs().sum().item()  # total variation: ~0.07 expected at n = 400
    assert tv < 0.15, tv  # greedy instead would be ~0.65 away
    assert probs.max() < 0.5


def test_close_stops_vllm_and_removes_its_files(backends):  # last of the tests on `backends`
    _, vllm = backends
    proc, workdir = vllm._runner.proc, vllm.workdir
    assert proc.poll() is None and os.path.isdir(workdir)
    vllm.close()
    assert proc.poll() is not None and not os.path.exists(workdir)
    vllm.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        vllm.generate(_samples(3))


def test_vllm_errors_quote_the_engine():
    from specforge_vllm.backend import VLLMError, VLLMTargetBackend

    cfg = _config([], "inference.backend=vllm", f"inference.vllm.python={PYTHON}",
                  "inference.vllm.extra_args.no_such_engine_arg=1")
    with pytest.raises(VLLMError, match="starting vLLM.*no_such_engine_arg"):
        VLLMTargetBackend(cfg.options("inference", "vllm"), cfg, "cpu")


def _losses(backend: str, out: Path, *overrides: str) -> list[float]:
    from specforge_core.api import Pipeline

    result = Pipeline.from_files(QUICKSTART, overrides=[
        f"inference.backend={backend}", f"run.output_dir={out / backend}", "logging.progress=false",
        f"dataset.cache_dir={out / 'cache'}", *overrides]).run()
    return [h["loss"] for h in result.history]


def test_quickstart_trains_to_the_hf_losses(tmp_path):
    hf = _losses("hf", tmp_path, "training.num_epochs=1")
    vllm = _losses("vllm", tmp_path, "training.num_epochs=1")
    assert len(hf) == len(vllm) == 50
    torch.testing.assert_close(torch.tensor(vllm), torch.tensor(hf), rtol=1e-5, atol=0)


@pytest.mark.ray
def test_ray_quickstart_trains_to_the_hf_losses(tmp_path):
    ray_cfg = str(ROOT / "configs" / "quickstart-ray.toml")
    from specforge_core.api import Pipeline

    def losses(backend: str) -> list[float]:
        result = Pipeline.from_files(ray_cfg, overrides=[
            f"inference.backend={backend}", f"run.output_dir={tmp_path / backend}", "logging.progress=false",
            "training.max_steps=6", f"dataset.cache_dir={tmp_path / 'cache'}"]).run()
        return [h["loss"] for h in result.history]

    hf, vllm = losses("hf"), losses("vllm")
    assert len(hf) == len(vllm) == 6
    torch.testing.assert_close(torch.tensor(vllm), torch.tensor(hf), rtol=1e-5, atol=0)


def _reference_target() -> Path:
    from specforge_core.reference import MODEL_DIRNAME, default_dir

    path = default_dir() / MODEL_DIRNAME
    if not (path / "config.json").is_file():
        pytest.skip(f"no reference target at {path} (`specforge reference fetch`, or set $SPECFORGE_REFERENCE_DIR)")
    return path


def test_reference_target_features_equal_hf():
    """SmolLM2-135M (30 layers, tied embeddings, residual-stream outliers ~3e4): fp32 agreement is
    relative, so the bound scales with each tensor's largest value."""
    from specforge_hf_backend.backend import HFTargetBackend
    from specforge_hf_backend.options import HFBackendOptions
    from specforge_vllm.backend import VLLMTargetBackend

    target = _reference_target()
    cfg = load_config(data={"model": {"target": str(target), "aux_layers": [3, 14, 26]},
                            "dataset": {"max_seq_length": 256},
                            "inference": {"batch_size": 4, "backend": "vllm", "vllm": {"python": PYTHON}}})
    g = torch.Generator().manual_seed(0)
    samples = [Sample(f"s{i}", torch.randint(0, 49152, (n,), generator=g), torch.ones(n, dtype=torch.uint8))
               for i, n in enumerate([200, 37, 129])]
    vllm = VLLMTargetBackend(cfg.options("inference", "vllm"), cfg, "cpu")
    try:
        got = vllm.generate(samples)
    finally:
        vllm.close()
    want = HFTargetBackend(HFBackendOptions(), cfg, "cpu").generate(samples)
    H = 576
    for w, x in zip(want, got, strict=True):
        parts = [(w.aux_hidden[:, j * H : (j + 1) * H], x.aux_hidden[:, j * H : (j + 1) * H]) for j in range(3)]
        for a, b in [*parts, (w.final_hidden, x.final_hidden)]:
            assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-4
        assert torch.equal(x.target_argmax, w.target_argmax)
