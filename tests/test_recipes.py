"""The recipes in configs/: each validates with `specforge config validate` against the target
config.json shipped in configs/targets/, the shipped draft configs equal what llama-eagle3 generates
from those targets, and the semantic checks catch the mistakes a user makes when editing a recipe."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from specforge_core.checks import check_config
from specforge_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = sorted(CONFIGS.glob("*.toml"))
H100 = str(CONFIGS / "kimi-k2.5-sglang-3x8-h100.toml")
H200 = str(CONFIGS / "kimi-k2.5-sglang-2x8-h200.toml")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their target/draft files relative to the repo root


GPU_RECIPES = ["qwen3-8b-hf-1node-3gpu.toml", "qwen3-8b-sglang-1node.toml", "kimi-k2.5-sglang-2x8-h200.toml",
               "kimi-k2.5-sglang-3x8-h100.toml"]

# One interpreter runs `specforge config validate` once per argument list (importing torch and the
# plugins once instead of per recipe) and reports each exit code and stderr.
_RUNNER = """
import contextlib, io, json, sys
from specforge_core.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["config", "validate", "--skip-inputs", *args])  # recipes for other machines
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _validate(*arg_lists: list[str]) -> list[tuple[int, str, str]]:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(arg_lists)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def test_every_recipe_validates_with_the_cli():
    names = [p.name for p in RECIPES]
    assert set(GPU_RECIPES) | {"base-gpu.toml"} <= set(names)
    bad_tp = [H100, "inference.num_gpus=24", "inference.gpus_per_engine=8", "inference.sglang.tp_size=24",
              "inference.sglang.nnodes=3", "training.num_gpus=1", "run.nodes=4"]
    results = _validate(*[[str(p.relative_to(ROOT))] for p in RECIPES], bad_tp)
    for name, (rc, out, err) in zip(names, results, strict=False):
        assert rc == 0, f"{name}: {err}"
        assert out.startswith("ok:"), f"{name}: {out}"
        if name in GPU_RECIPES:
            assert "warning" not in err, f"{name}: {err}"
    rc, out, err = results[-1]
    assert rc == 2, out
    assert "TP size 24 does not divide the target's 64 attention heads" in err


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_recipes_are_clean_and_use_every_gpu(recipe):
    cfg = load_config([CONFIGS / recipe])
    assert check_config(cfg, inputs=False) == []
    run = cfg.run
    assert cfg.inference.num_gpus + cfg.training.num_gpus == run.nodes * run.gpus_per_node
    assert run.gpu_memory_gib > 0 and cfg.model.target_config


def _errors(*overrides: str, path: str = H100) -> list[str]:
    probs = check_config(load_config([path], list(overrides)), inputs=False)
    return [f"{p.key}: {p.message}" for p in probs if p.level == "error"]


def test_kimi_weights_do_not_fit_tp8_on_h100():
    errs = _errors("inference.num_gpus=8", "inference.gpus_per_engine=4", "inference.sglang.tp_size=8",
                   "training.num_gpus=16")
    assert any(e.startswith("inference.sglang.mem_fraction_static") and "per GPU at TP 8" in e for e in errs), errs


def test_kimi_tp8_fits_on_h200():
    cfg = load_config([H200])
    assert check_config(cfg, inputs=False) == []


def test_mooncake_sizes_must_cover_max_seq_length():
    errs = _errors("dataset.max_seq_length=8192", "inference.sglang.context_length=8192")
    assert any(e.startswith("transfer.mooncake.sample_bytes") for e in errs), errs
    assert _errors("dataset.max_seq_length=8192", "inference.sglang.context_length=8192",
                   "transfer.mooncake.sample_bytes=0", "transfer.mooncake.global_segment_size=0",
                   "transfer.mooncake.local_buffer_size=0") == []


def test_target_shape_checks():
    assert any(e.startswith("model.aux_layers") and "1..60" in e for e in _errors("model.aux_layers=[2, 30, 61]"))
    assert any(e.startswith("inference.sglang.context_length") for e in _errors("inference.sglang.context_length=2048"))
    probs = check_config(load_config([H100], ["model.draft_vocab_size=200000"]), inputs=False)
    warns = [p for p in probs if p.level == "warning"]
    assert any("exceeds the target's vocab_size 163840" in p.message for p in warns)
    # the draft file must agree with the vocab mapping size
    assert any("draft_vocab_size = 32000" in e for e in _errors("model.draft_vocab_size=16000"))


def test_missing_target_config_is_an_error_and_hub_id_alone_a_warning():
    assert any("no such file" in e for e in _errors("model.target_config=configs/targets/nope"))
    probs = check_config(load_config([H100], ["model.target_config="]), inputs=False)
    assert [p.level for p in probs] == ["warning"] and "model.target_config" in probs[0].message


# ------------------------------------------------------------------------------- target files
def test_target_configs_load_with_the_core_loader():
    from specforge_llama_eagle3.config import default_aux_layer_ids as default_aux_layers

    from specforge_core.target import load_target_config

    qwen = load_target_config(str(CONFIGS / "targets/Qwen3-8B"))
    assert (qwen["num_hidden_layers"], qwen["hidden_size"], qwen["vocab_size"]) == (36, 4096, 151936)
    kimi = load_target_config(str(CONFIGS / "targets/Kimi-K2.5"))  # text_config lifted to the top
    assert (kimi["num_hidden_layers"], kimi["hidden_size"], kimi["vocab_size"]) == (61, 7168, 163840)
    assert default_aux_layers(61) == [2, 30, 58]


# -------------------------------------------------------------------------------- draft files
def _generator():
    spec = importlib.util.spec_from_file_location("draft_generate", CONFIGS / "draft_models/generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["qwen3-8b-eagle3.json", "kimi-k2.5-eagle3.json"])
def test_draft_configs_equal_generation(name):
    gen = _generator()
    assert (CONFIGS / "draft_models" / name).read_text() == gen.render(name), (
        "stale: run python configs/draft_models/generate.py")


def test_qwen_draft_is_exactly_from_target():
    from specforge_llama_eagle3.config import DraftConfig

    target = json.loads((CONFIGS / "targets/Qwen3-8B/config.json").read_text())
    shipped = json.loads((CONFIGS / "draft_models/qwen3-8b-eagle3.json").read_text())
    assert shipped == DraftConfig.from_target(target, 32000).export_dict()


def test_kimi_draft_replaces_only_the_unsupported_yarn_rope():
    from specforge_llama_eagle3.config import DraftConfig, DraftConfigError

    target = json.loads((CONFIGS / "targets/Kimi-K2.5/config.json").read_text())
    with pytest.raises(DraftConfigError, match="yarn"):
        DraftConfig.from_target(target, 32000)
    shipped = json.loads((CONFIGS / "draft_models/kimi-k2.5-eagle3.json").read_text())
    assert shipped["rope_scaling"] is None and shipped["rope_theta"] == target["text_config"]["rope_theta"]
    # the plugin accepts the file for this target (hidden size and vocab agree)
    cfg = DraftConfig.from_file(CONFIGS / "draft_models/kimi-k2.5-eagle3.json", 7168, 163840, 32000)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (7168, 64, 112)
