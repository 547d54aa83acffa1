"""The real vLLM environment the `vllm`-marked tests run through (`nox -s vllm` builds it), the short
drafts they serve, and the per-prompt comparison every engine check makes."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def vllm_python_or_skip() -> str:
    """The vLLM venv's python; skips the calling module (or test) when there is none."""
    from specforge_vllm.eval_engine import vllm_python

    try:
        return vllm_python(None)
    except ValueError as exc:
        return pytest.skip(f"no vLLM environment: {exc}", allow_module_level=True)


def train_quickstart(out: Path, *overrides: str) -> Path:
    """A quickstart draft on the tiny target, 40 steps, with ``overrides``; its export folder."""
    from specforge_core.config import load_config
    from specforge_core.pipeline.local import run_local

    cfg = load_config([ROOT / "configs" / "quickstart.toml"], overrides=[
        f"run.output_dir={out}", "training.max_steps=40", "logging.progress=false",
        f"dataset.cache_dir={out / 'cache'}", *overrides])
    return Path(run_local(cfg).export_dir)


def train_gemma3_cpu(out: Path, *overrides: str) -> Path:
    """A draft for the real Gemma 3 270M from its CPU recipe (16 samples of 192 tokens), with
    ``overrides``; its export folder. Skips when `specforge reference fetch --gemma3` has not run."""
    from specforge_core.config import load_config
    from specforge_core.pipeline.local import run_local
    from specforge_core.reference import Paths, default_dir

    ref = Paths(default_dir())
    if not (ref.gemma3 / "model.safetensors").is_file() or not ref.sharegpt_small.is_file():
        pytest.skip(f"no Gemma 3 / ShareGPT in {ref.root} (`specforge reference fetch --gemma3`)")
    cfg = load_config([ROOT / "configs" / "gemma3-270m-sharegpt-cpu.toml"], overrides=[
        f"model.target={ref.gemma3}", f'dataset.path=["{ref.sharegpt_small}"]', f"run.output_dir={out / 'run'}",
        f"dataset.cache_dir={out / 'cache'}", "dataset.max_samples=16", "dataset.max_seq_length=192",
        "logging.progress=false", *overrides])
    return Path(run_local(cfg).export_dir)


def assert_same_per_prompt(hf, vllm) -> None:
    """Two evaluation reports of the same prompts agree prompt by prompt: the same ids, generated
    tokens and acceptance counts, EOS-truncated (the project's rule) and raw (vLLM's own)."""
    for a, b in zip(hf.prompts, vllm.prompts, strict=True):
        assert a.sample_id == b.sample_id
        assert (a.generated, a.stats) == (b.generated, b.stats), a.sample_id
        assert a.raw == b.raw, a.sample_id
