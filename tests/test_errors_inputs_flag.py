"""`config validate` checks that a run's inputs are here; `--skip-inputs` and `specforge plan` size a
recipe meant for another machine without them (its data lives on the cluster)."""

from __future__ import annotations

from pathlib import Path

from specforge_core import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/qwen3-8b-hf-1node-3gpu.toml"  # names data/train.jsonl, not in the repository


def test_validate_rejects_a_missing_data_file_unless_told_to_skip_inputs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert not Path("data/train.jsonl").exists()
    assert cli.main(["config", "validate", RECIPE]) == 2
    err = capsys.readouterr().err
    # the recipe's path is relative to configs/ (../data/train.jsonl), named absolute
    assert f"error: dataset.path: {ROOT}/data/train.jsonl: data file not found" in err
    assert cli.main(["config", "validate", "--skip-inputs", RECIPE]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    # the shape checks still run with --skip-inputs
    assert cli.main(["config", "validate", "--skip-inputs", RECIPE, "training.betas=[0.9]"]) == 2
    assert "training.betas: [0.9]: AdamW takes two values" in capsys.readouterr().err


def test_plan_sizes_a_recipe_whose_data_is_elsewhere(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["plan", RECIPE]) == 0
    out = capsys.readouterr().out
    assert "B/token" in out and "data file not found" not in out
