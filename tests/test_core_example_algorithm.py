"""An outside draft algorithm (examples/plugins/specforge-mlp-head), installed for real, trains
and exports through the generic core, and ``specforge plan`` sizes it; no core file knows it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "specforge-mlp-head"

TRAIN = """
import json, sys
from specforge_core.api import Pipeline
pipe = Pipeline.from_dict({
    "run": {"name": "mlp", "output_dir": sys.argv[1]},
    "model": {"target": "configs/assets/tiny-target", "draft": "mlp-head", "draft_vocab_size": 256},
    "dataset": {"path": ["configs/assets/data/sample_chat.jsonl"], "max_samples": 16, "cache_dir": sys.argv[2]},
    "training": {"max_steps": 12, "lr": 1e-2, "micro_batch_size": 2, "warmup_ratio": 0.0,
                 "scheduler": "constant"},
    "logging": {"progress": False},
}, overrides=["model.mlp-head.hidden_size=48"])
r = pipe.run()
print(json.dumps({"steps": r.steps, "export": str(r.export_dir), "loss": [m["loss"] for m in r.history],
                  "keys": sorted(r.history[-1])}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(EXAMPLE)],
        check=True,
    )
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
                COLUMNS="200")


def test_outside_algorithm_trains_and_exports(installed, tmp_path):
    out = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / "run"), str(tmp_path / "cache")],
                         env=installed, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["steps"] == 12
    assert "acc_0_invocab" in res["keys"] and "loss_0" in res["keys"]
    assert res["loss"][-1] < res["loss"][0]  # it learns
    export = Path(res["export"])
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["architectures"] == ["MLPHeadDraft"] and cfg["hidden_size"] == 48
    from safetensors.torch import load_file

    tensors = load_file(str(export / "model.safetensors"))
    assert tensors["fc.weight"].shape == (48, cfg["input_size"])
    assert tensors["lm_head.weight"].shape == (256, 48) and tensors["d2t"].shape == (256,)


def test_plan_sizes_the_outside_algorithm(installed):
    out = subprocess.run([sys.executable, "-m", "specforge_core.cli", "plan", "configs/quickstart.toml",
                          "model.draft=mlp-head", "model.mlp-head.hidden_size=48"],
                         env=installed, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "draft (mlp-head options)" in out.stdout
    # trainable = fc (2 aux x H x 48: the example's own default layers) + head (48 x draft vocab)
    t = json.loads((ROOT / "configs/assets/tiny-target/config.json").read_text())
    import tomllib

    vd = min(tomllib.loads((ROOT / "configs/quickstart.toml").read_text())["model"]["draft_vocab_size"],
             t["vocab_size"])
    assert f"{2 * t['hidden_size'] * 48 + 48 * vd:,} trainable" in out.stdout
