"""Config layering, overrides, unknown keys and type errors with their paths, show round trip."""

import subprocess
import sys
from pathlib import Path

import pytest

from specforge_core.config import ConfigError, dump_toml, load_config
from specforge_core.config.loader import parse_override

ROOT = Path(__file__).resolve().parents[1]


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_then_files_then_overrides(tmp_path):
    base = write(tmp_path / "base.toml", '[training]\nlr = 1e-4\nlog_every = 5\n[model]\ntarget = "base-model"\n')
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[training]\nlr = 3e-4\n')
    cfg = load_config([child], overrides=["training.log_every=6"])
    assert cfg.training.lr == 3e-4  # child beats base
    assert cfg.training.log_every == 6  # command line beats files
    assert cfg.model.target == "base-model"  # inherited from base
    assert cfg.training.micro_batch_size == 1  # built-in default
    assert cfg.sources["training.lr"] == str(child)
    assert cfg.sources["model.target"] == str(base)
    assert cfg.sources["training.log_every"] == "command line"
    # two files given directly: later wins
    other = write(tmp_path / "other.toml", "[training]\nlr = 9e-4\n")
    assert load_config([child, other]).training.lr == 9e-4


def test_override_values_are_toml():
    assert parse_override("training.lr=5e-5") == (["training", "lr"], 5e-5)
    assert parse_override("model.aux_layers=[1, 4, 6]") == (["model", "aux_layers"], [1, 4, 6])
    assert parse_override("training.resume=true") == (["training", "resume"], True)
    assert parse_override("model.target=Qwen/Qwen3-8B") == (["model", "target"], "Qwen/Qwen3-8B")
    assert parse_override('run.name="a b"') == (["run", "name"], "a b")
    cfg = load_config(overrides=["training.lr=5e-5", "model.aux_layers=[1,4,6]", "training.resume=true"])
    assert (cfg.training.lr, cfg.model.aux_layers, cfg.training.resume) == (5e-5, [1, 4, 6], True)


def test_unknown_key_names_path_file_and_suggestion(tmp_path):
    f = write(tmp_path / "bad.toml", "[training]\nlearning_rte = 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config([f])
    msg = str(err.value)
    assert str(f) in msg and "training.learning_rte" in msg and "unknown key" in msg
    f2 = write(tmp_path / "bad2.toml", "[trainig]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"trainig: unknown key; did you mean 'training'\?"):
        load_config([f2])
    f3 = write(tmp_path / "bad3.toml", "[training]\nwarmup_ratoi = 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'training.warmup_ratio'\?"):
        load_config([f3])
    with pytest.raises(ConfigError, match=r"command line: model.targte: unknown key; did you mean 'model.target'"):
        load_config(overrides=["model.targte=x"])


def test_bad_type_and_range_name_field_and_allowed(tmp_path):
    f = write(tmp_path / "t.toml", '[training]\nmicro_batch_size = "two"\n')
    with pytest.raises(ConfigError) as err:
        load_config([f])
    assert str(f) in str(err.value) and "training.micro_batch_size" in str(err.value)
    assert "expected an integer" in str(err.value)
    with pytest.raises(ConfigError, match=r"training.warmup_ratio: 2.0 is out of range; allowed: \[0, 1\]"):
        load_config(overrides=["training.warmup_ratio=2.0"])
    with pytest.raises(ConfigError, match=r"dataset.chat_template: 'vicuna' is not allowed; allowed: 'auto', 'llama3'"):
        load_config(overrides=["dataset.chat_template='vicuna'"])
    with pytest.raises(ConfigError, match=r"training.resume: expected true or false"):
        load_config(overrides=["training.resume=1"])
    with pytest.raises(ConfigError, match=r"model.aux_layers: expected a list of an integer"):
        load_config(overrides=["model.aux_layers=['a']"])


def test_plugin_table_typed_by_plugin_class():
    cfg = load_config(overrides=["inference.backend='hf'"])
    assert cfg.options("inference", "hf") is not None  # selected component gets its defaults
    with pytest.raises(ConfigError, match=r"inference.hff: unknown key; did you mean 'inference.hf'"):
        load_config(overrides=["inference.hff.x=1"])


def test_extends_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config([tmp_path / "a.toml"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.toml"])
    bad = write(tmp_path / "syntax.toml", "[training\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"syntax.toml: invalid TOML.*line 1"):
        load_config([bad])


def test_show_round_trip(tmp_path):
    f = write(
        tmp_path / "c.toml",
        '[model]\ntarget = "some/model"\naux_layers = [2, 5]\n[training]\nlr = 3e-5\nbetas = [0.8, 0.9]\n'
        '[dataset]\npath = ["a.jsonl", "b.jsonl"]\nmax_samples = 10\n[run]\nname = "q\\"uote"\n',
    )
    cfg = load_config([f], overrides=["training.warmup_ratio=0.1"])
    text = dump_toml(cfg)
    again = load_config([write(tmp_path / "shown.toml", text)])
    assert again.run == cfg.run and again.model == cfg.model and again.training == cfg.training
    assert again.dataset == cfg.dataset and again.plugin_options == cfg.plugin_options
    assert dump_toml(again) == text
    # and through the real command line
    out = subprocess.run(
        [sys.executable, "-m", "specforge_core.cli", "config", "show", str(f), "training.warmup_ratio=0.1"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out == text


def test_cli_validate_reports_error_exit_code(tmp_path):
    f = write(tmp_path / "bad.toml", "[training]\nlr = -1\n")
    res = subprocess.run(
        [sys.executable, "-m", "specforge_core.cli", "config", "validate", str(f)], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert "training.lr" in res.stderr and str(f) in res.stderr
    ok = subprocess.run(  # the defaults name no data, which validate (like run) refuses: the quickstart
        [sys.executable, "-m", "specforge_core.cli", "config", "validate", "configs/quickstart.toml"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("ok")
