"""The outside draft algorithm (examples/plugins/specforge-mlp-head), pip-installed into a private
prefix, end to end through the generic core: it trains on the quickstart tiny target with *its own*
default aux layers (model.aux_layers unset), `specforge export` re-exports the same draft,
`specforge plan` and `config validate` see the same layers, and `specforge eval` measures it with
its proposer: the acceptance equals a slow reference computed here another way (plain greedy
decoding without a cache, the head applied by hand to HF hidden_states). No core file names it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "specforge-mlp-head"
TARGET = ROOT / "configs" / "assets" / "tiny-target"
DATA = ROOT / "configs" / "assets" / "data"

pytestmark = pytest.mark.skipif(not (TARGET / "model.safetensors").is_file(),
                                reason="configs/assets/tiny-target has no weights")

TRAIN = """
import json, sys
from specforge_core.api import Pipeline
pipe = Pipeline.from_dict({
    "run": {"name": "mlp", "output_dir": sys.argv[1]},
    "model": {"target": "configs/assets/tiny-target", "draft": "mlp-head", "draft_vocab_size": 256},
    "dataset": {"path": ["configs/assets/data/sample_chat.jsonl"], "max_samples": 32, "cache_dir": sys.argv[2]},
    "training": {"max_steps": 30, "lr": 1e-2, "micro_batch_size": 4, "warmup_ratio": 0.0,
                 "scheduler": "constant"},
    "eval": {"steps": 1},
    "logging": {"progress": False},
})
r = pipe.run()
print(json.dumps({"export": str(r.export_dir)}))
"""

EVAL = """
import json, sys
from specforge_core.evaluation import evaluate
rep = evaluate(sys.argv[1], "configs/assets/tiny-target", ["configs/assets/data/eval_prompts.jsonl"], steps=1,
               max_new_tokens=20, max_prompts=4, eos_ids=(), dtype="fp32", device="cpu", fast=sys.argv[2] == "fast")
print(json.dumps({"cycles": rep.overall.cycles, "tokens": rep.overall.tokens, "ok": rep.ok,
                  "per_prompt": [[p.stats.cycles, p.stats.tokens] for p in rep.prompts]}))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(EXAMPLE)], check=True)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
                COLUMNS="200")


def _run(env: dict, *args: str) -> str:
    out = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp")
    res = json.loads(_run(env, "-c", TRAIN, str(tmp / "run"), str(tmp / "cache")).strip().splitlines()[-1])
    return tmp / "run", Path(res["export"])


def _layers(num_layers: int) -> list[int]:
    return [num_layers // 2, num_layers - 1]  # the example's documented default, not EAGLE-3's 2, L//2, L-3


@pytest.mark.slow
def test_trains_and_exports_with_its_own_default_aux_layers(env, trained, tmp_path):
    from safetensors.torch import load_file

    run_dir, export = trained
    hf = json.loads((TARGET / "config.json").read_text())
    L, H = hf["num_hidden_layers"], hf["hidden_size"]
    assert _layers(L) != [2, L // 2, L - 3]
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["aux_layer_ids"] == _layers(L) and cfg["input_size"] == 2 * H
    # the run dir keeps model.aux_layers as the user wrote it (unset)
    assert "aux_layers = []" in (run_dir / "config.toml").read_text()
    # `specforge export` from the run dir resolves the same default and writes the same tensors
    again = tmp_path / "again"
    _run(env, "-m", "specforge_core.cli", "export", str(run_dir / "config.toml"), "--output", str(again))
    assert json.loads((again / "config.json").read_text()) == cfg
    a, b = load_file(str(export / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # plan and validate see the algorithm's layers and size its head from them
    plan = _run(env, "-m", "specforge_core.cli", "plan", "configs/quickstart.toml", "model.draft=mlp-head",
                "model.mlp-head.hidden_size=48")
    assert f"aux layers {_layers(L)}" in plan
    vd = 512  # quickstart's draft_vocab_size (the tiny target has more ids)
    assert f"{2 * H * 48 + 48 * vd:,} trainable" in plan
    _run(env, "-m", "specforge_core.cli", "config", "validate", "configs/quickstart.toml", "model.draft=mlp-head",
         "eval.steps=1")


def reference_counts(export: Path, prompts: list[list[int]], max_new: int) -> list[tuple[int, int]]:
    """(cycles, committed tokens) per prompt of greedy speculation with one draft token, computed
    the slow way: greedy decoding by full forwards (no cache), then the head on hidden_states."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((export / "config.json").read_text())
    w = {k: v.float() for k, v in load_file(str(export / "model.safetensors")).items()}
    d2t = w["d2t"].long()
    model = AutoModelForCausalLM.from_pretrained(str(TARGET), torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            seq = list(prompt)
            for _ in range(max_new):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            feats = torch.cat([hs[i][0] for i in cfg["aux_layer_ids"]], -1)
            P, y = len(prompt), seq[len(prompt):]
            cycles = tokens = 0
            g = 1  # the prefill gave y[0]
            while g < max_new:
                f = feats[P + g - 2]  # feature of the position before the last committed token
                logits = torch.nn.functional.linear(torch.nn.functional.silu(
                    torch.nn.functional.linear(f, w["fc.weight"])), w["lm_head.weight"])
                draft = int(logits.argmax()) + int(d2t[int(logits.argmax())])
                committed = min(2 if draft == y[g] else 1, max_new - g)
                cycles, tokens, g = cycles + 1, tokens + committed, g + committed
            out.append((cycles, tokens))
    return out


@pytest.mark.slow
def test_eval_acceptance_equals_a_slow_reference(env, trained):
    from specforge_core.data import load_prompts, load_tokenizer

    _, export = trained
    exact = json.loads(_run(env, "-c", EVAL, str(export), "exact").strip().splitlines()[-1])
    fast = json.loads(_run(env, "-c", EVAL, str(export), "fast").strip().splitlines()[-1])
    assert exact["ok"], "speculative output differs from plain greedy"
    prompts = load_prompts([str(DATA / "eval_prompts.jsonl")], load_tokenizer(str(TARGET)), "auto", 2048)[:4]
    ref = reference_counts(export, [p.input_ids.tolist() for p in prompts], 20)
    assert [tuple(x) for x in exact["per_prompt"]] == ref
    assert [tuple(x) for x in fast["per_prompt"]] == ref
    accepted = sum(t - c for c, t in ref)
    assert 0 < accepted < sum(c for c, _ in ref), ref  # both branches of the verifier were exercised


def test_no_core_file_knows_the_example_and_it_imports_no_bundled_plugin():
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["specforge"]
    bundled = {v.split(".")[0].split(":")[0] for v in eps.values()}
    for path in (ROOT / "specforge_core").rglob("*.py"):
        text = path.read_text()
        assert not any(n in text for n in ("mlp-head", "mlp_head", "MLPHead")), path
    for path in (EXAMPLE / "specforge_mlp_head").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not [m for m in mods if m.split(".")[0] in bundled], (path, mods)
