"""#18.10: a relative path in a config means the directory of the file that wrote it (as ``extends``
does), a command-line override or a default means the working directory, whatever the cwd is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from specforge_core import cli
from specforge_core.config import CORE_SECTIONS, load_config
from specforge_core.config.fields import option, path_kind
from specforge_core.config.paths import resolve_one

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_each_value_resolves_against_the_file_that_set_it(tmp_path, monkeypatch):
    base = _write(tmp_path / "base" / "base.toml", """
[run]
output_dir = "out/{name}"
[model]
target = "../models/tiny"
target_config = "cfg/config.json"
[dataset]
path = ["data/a.jsonl", "/abs/b.jsonl"]
[model.llama-eagle3]
config = "draft.json"
""")
    child = _write(tmp_path / "recipes" / "deep" / "child.toml", f"""
extends = "{os.path.relpath(base, tmp_path / 'recipes' / 'deep')}"
[dataset]
cache_dir = "cache"
[eval]
data = ["prompts.jsonl"]
""")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config([os.path.relpath(child, elsewhere)], ["model.vocab_mapping=v.safetensors"])
    b, c = tmp_path / "base", tmp_path / "recipes" / "deep"
    assert cfg.run.output_dir == f"{b}/out/{{name}}"
    assert cfg.output_dir == f"{b}/out/specforge"
    assert cfg.model.target == str(tmp_path / "models" / "tiny")
    assert cfg.model.target_config == f"{b}/cfg/config.json"
    assert cfg.dataset.path == [f"{b}/data/a.jsonl", "/abs/b.jsonl"]
    assert cfg.options("model", "llama-eagle3").config == f"{b}/draft.json"  # a plugin option opts in
    assert cfg.dataset.cache_dir == f"{c}/cache"
    assert cfg.eval.data == [f"{c}/prompts.jsonl"]
    # the command line and the defaults mean the working directory
    assert cfg.model.vocab_mapping == f"{elsewhere}/v.safetensors"
    assert cfg.profiler.output_dir == "{output_dir}/traces"  # a placeholder is its owner's business
    assert load_config([child]).model.vocab_mapping is None
    assert load_config().run.output_dir == f"{elsewhere}/runs/{{name}}"


def test_overrides_resolve_against_the_cwd_and_the_same_config_means_the_same_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    at_root = load_config([str(QUICKSTART.relative_to(ROOT))], ["dataset.path=configs/assets/data/eval_prompts.jsonl"])
    monkeypatch.chdir(tmp_path)
    at_tmp = load_config([str(QUICKSTART)], [f"dataset.path={ROOT}/configs/assets/data/eval_prompts.jsonl"])
    assert at_root.dataset.path == at_tmp.dataset.path == [str(ROOT / "configs/assets/data/eval_prompts.jsonl")]
    for cfg in (at_root, at_tmp):
        assert cfg.model.target == str(ROOT / "configs/assets/tiny-target")
        assert cfg.eval.data == [str(ROOT / "configs/assets/data/eval_prompts.jsonl")]
        assert cfg.output_dir == str(ROOT / "runs/quickstart")  # README: runs/quickstart/export
        assert Path(cfg.model.target, "config.json").is_file()
    # the default cache is the one field left to the cwd
    assert at_root.dataset.cache_dir == str(ROOT / ".cache/specforge")
    assert at_tmp.dataset.cache_dir == str(tmp_path / ".cache/specforge")


def test_hub_ids_commands_urls_and_absolute_paths_are_kept(tmp_path):
    hub, cmd, plain = "path-or-hub-id", "path-or-command", "path"
    assert resolve_one("Qwen/Qwen3-8B", hub, tmp_path) == "Qwen/Qwen3-8B"
    assert resolve_one("gpt2", hub, tmp_path) == "gpt2"
    (tmp_path / "Qwen" / "Qwen3-8B").mkdir(parents=True)  # a local copy of that name wins, as in HF
    assert resolve_one("Qwen/Qwen3-8B", hub, tmp_path) == f"{tmp_path}/Qwen/Qwen3-8B"
    assert resolve_one("./gpt2", hub, tmp_path) == f"{tmp_path}/gpt2"
    assert resolve_one("models/org/name", hub, tmp_path) == f"{tmp_path}/models/org/name"
    assert resolve_one("python3", cmd, tmp_path) == "python3"
    assert resolve_one("venv/bin/python", cmd, tmp_path) == f"{tmp_path}/venv/bin/python"
    assert resolve_one("s3://bucket/x", plain, tmp_path) == "s3://bucket/x"
    assert resolve_one("/abs/x", plain, tmp_path) == "/abs/x"
    assert resolve_one("", plain, tmp_path) == ""
    assert resolve_one("~/x", plain, tmp_path) == os.path.expanduser("~/x")
    assert resolve_one("a/../b/./c", plain, tmp_path) == f"{tmp_path}/b/c"


def test_the_path_fields_are_marked_and_a_bad_marker_is_refused():
    marked = {f"{s}.{f.name}": path_kind(f) for s, cls in CORE_SECTIONS.items() for f in attrs.fields(cls)
              if path_kind(f)}
    assert marked == {
        "run.output_dir": "path", "model.target": "path-or-hub-id", "model.vocab_mapping": "path",
        "model.target_config": "path", "dataset.path": "path", "dataset.cache_dir": "path",
        "eval.data": "path", "eval.engine_python": "path-or-command", "profiler.output_dir": "path",
        "regenerate.output": "path",
    }
    with pytest.raises(ValueError, match="path-or-hub-id"):
        option("", "x", path="directory")


def test_config_show_prints_absolute_paths_that_read_back_the_same_from_another_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert cli.main(["config", "show", "configs/quickstart.toml"]) == 0
    dumped = _write(tmp_path / "elsewhere" / "dumped.toml", capsys.readouterr().out)
    assert f'target = "{ROOT}/configs/assets/tiny-target"' in dumped.read_text()
    monkeypatch.chdir(tmp_path)
    assert load_config([dumped]) == load_config([QUICKSTART], [f"dataset.cache_dir={ROOT}/.cache/specforge"])


def test_a_wrong_type_in_a_path_field_is_still_reported(tmp_path):
    bad = _write(tmp_path / "bad.toml", "[dataset]\npath = [1, 2]\n")
    with pytest.raises(ValueError, match=r"dataset\.path: expected a list of a string"):
        load_config([bad])


@pytest.mark.slow
def test_a_run_from_another_directory_writes_next_to_its_config(tmp_path):
    """Real CLI runs, in subprocesses whose cwd is neither the repo nor the config's directory."""
    recipe = _write(tmp_path / "mine" / "my.toml", f'extends = "{QUICKSTART}"\n[run]\noutput_dir = "runs/{{name}}"\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    small = ["training.max_steps=1", "dataset.max_samples=8", "logging.progress=false", "training.save_every=0"]
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-m", "specforge_core.cli", "run", str(recipe), *small],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "mine/runs/quickstart/export/model.safetensors").is_file()  # file-relative output_dir
    assert not (cwd / "runs").exists() and not (ROOT / "configs/runs").exists()
    # the shipped quickstart from elsewhere, output_dir on the command line: relative to the cwd
    run = subprocess.run([sys.executable, "-m", "specforge_core.cli", "run", str(QUICKSTART), *small,
                          "run.output_dir=out"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (cwd / "out/export/model.safetensors").is_file()
