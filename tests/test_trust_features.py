"""The feature cache trusts nothing it reads back: its fingerprint covers every input of
tokenization, each sample's cached tokens are compared with the run's own, every shard carries a
sha256 that is checked, and a missing or truncated file is refused before the run starts, named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from specforge_core import cli
from specforge_core.config import ConfigError, load_config
from specforge_core.data.features import FeatureCacheError, read_index, write_features
from specforge_core.pipeline.local import run_local

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def _reasoning_data(tmp_path: Path, n: int = 8) -> Path:
    """Conversations whose assistant turns carry reasoning (kept or dropped by dataset.reasoning)."""
    f = tmp_path / "think.jsonl"
    with open(f, "w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"t{i}", "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}.",
                 "reasoning_content": f"Adding {i} to itself doubles it, so the sum is {2 * i}. " * 3},
            ]}) + "\n")
    return f


def _args(tmp_path: Path, *extra: str, run: str = "run", n: int = 8) -> list[str]:
    return [f"run.output_dir={tmp_path / run}", f"dataset.max_samples={n}", "inference.dtype=bf16",
            "inference.batch_size=1", "logging.progress=false", "training.num_epochs=1", "training.save_every=0",
            f"dataset.cache_dir={tmp_path / 'tok'}", "transfer.store=disk", f"transfer.disk.dir={tmp_path / 'cache'}",
            "transfer.disk.shard_samples=4", *extra]


def _config(tmp_path: Path, *extra: str, **kw):
    return load_config([QUICKSTART], overrides=_args(tmp_path, *extra, **kw))


def _think(tmp_path: Path, reasoning: str) -> list[str]:
    return [f"dataset.path=['{_reasoning_data(tmp_path)}']", "dataset.chat_template=qwen3",
            f"dataset.reasoning={reasoning}"]


def test_cache_of_another_reasoning_mode_is_refused(tmp_path):
    write_features(_config(tmp_path, *_think(tmp_path, "keep")))
    # the run's checks refuse it before any work (ConfigError carrying the cache's one line)
    with pytest.raises((FeatureCacheError, ConfigError), match=r"reasoning: cache 'keep', config 'drop'"):
        run_local(_config(tmp_path, *_think(tmp_path, "drop"), run="run-drop"))
    for setting, value in (("format", "openai"), ("on_error", "stop")):  # every tokenization input
        with pytest.raises((FeatureCacheError, ConfigError),
                           match=rf"{'data_format' if setting == 'format' else setting}: "):
            run_local(_config(tmp_path, *_think(tmp_path, "keep"), f"dataset.{setting}={value}", run="r2"))


def test_each_sample_is_compared_with_the_runs_tokenization(tmp_path):
    """Even with a fingerprint that matches (here forged), cached tokens of another tokenization
    never reach training: the sample's ids are compared with the run's own."""
    write_features(_config(tmp_path, *_think(tmp_path, "keep")))
    idx_file = tmp_path / "cache" / "index.json"
    idx = json.loads(idx_file.read_text())
    idx["fingerprint"]["reasoning"] = "drop"
    idx_file.write_text(json.dumps(idx))
    with pytest.raises(FeatureCacheError, match=r"sample 't\d' has \d+ tokens there but \d+ in this run's"):
        run_local(_config(tmp_path, *_think(tmp_path, "drop"), run="run-drop"))


def _flip(path: Path, n: int = 1001) -> None:
    raw = bytearray(path.read_bytes())
    for k in range(n):  # bytes in the data section (the header stays valid, the size the same)
        raw[-1 - 3 * k] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_changed_shard_is_refused_by_run_and_rewritten_by_features(tmp_path):
    cfg = _config(tmp_path)
    first = write_features(cfg)
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    original = shard.read_bytes()
    index = read_index(tmp_path / "cache")
    assert all(len(e["sha256"]) == 64 for e in index["shards"])
    _flip(shard)
    load_file(str(shard))  # still a readable safetensors file: only the checksum can tell
    with pytest.raises(FeatureCacheError, match=r"shard-00001.safetensors: sha256 .* differs from index.json"):
        run_local(cfg)
    again = write_features(cfg)  # the rerun re-hashes what it finds and writes the bad shard again
    assert again.written_shards == 1 and first.written_shards == 2
    assert shard.read_bytes() == original
    assert run_local(_config(tmp_path, run="run-2")).steps == 1


@pytest.mark.parametrize("damage", ["missing-shard", "truncated-shard", "truncated-index"])
def test_an_incomplete_cache_is_refused_before_any_work_naming_the_file(damage, tmp_path, capsys, monkeypatch):
    write_features(_config(tmp_path))
    cache = tmp_path / "cache"
    if damage == "missing-shard":
        (cache / "shard-00001.safetensors").unlink()
        named = "shard-00001.safetensors: shard missing"
    elif damage == "truncated-shard":
        f = cache / "shard-00000.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        named = "shard-00000.safetensors: 1,000 bytes, index.json lists"
    else:
        f = cache / "index.json"
        f.write_bytes(f.read_bytes()[:200])
        named = "index.json: not a valid index (truncated or corrupt"
    monkeypatch.chdir(ROOT)
    for argv in (["config", "validate"], ["run"]):
        assert cli.main([*argv, str(QUICKSTART), *_args(tmp_path)]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert len(lines) == 1 and named in lines[0], err
        assert not (tmp_path / "run").exists()  # refused before the run started
    again = write_features(_config(tmp_path))  # the rerun repairs it
    assert again.written_shards == (2 if damage == "truncated-index" else 1)
    assert run_local(_config(tmp_path)).steps == 1
