"""Resume knows a dataset by its content: a dataset that was only moved (same bytes, new path)
resumes, with a note; a file with other content is still refused, named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from specforge_core.config import load_config
from specforge_core.pipeline.local import run_local
from specforge_core.rundir import RunDirError, check_resume

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"


def _config(tmp_path: Path, target: Path, data: Path, *overrides: str):
    return load_config(data={
        "run": {"name": "moved", "output_dir": str(tmp_path / "out"), "seed": 3},
        "model": {"target": str(target), "draft_vocab_size": 256},
        "dataset": {"path": [str(data)], "max_samples": 4, "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 2, "micro_batch_size": 2, "gradient_accumulation": 1, "save_every": 1},
        "logging": {"progress": False},
    }, overrides=list(overrides))


def test_a_moved_dataset_resumes_and_other_content_is_refused(tmp_path, tiny_chat_target):
    data = tmp_path / "a" / "chat.jsonl"
    data.parent.mkdir()
    shutil.copy(ASSETS / "data" / "sample_chat.jsonl", data)
    first = run_local(_config(tmp_path, tiny_chat_target, data), stop_after_steps=1)
    assert first.steps == 1

    moved = tmp_path / "b" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.move(data, moved)
    notes: list[str] = []
    cfg = _config(tmp_path, tiny_chat_target, moved, "training.resume=true")
    from specforge_core.config import dump_toml

    check_resume(cfg, dump_toml(cfg), warn=notes.append)
    assert any("moved, same content" in n for n in notes), notes
    assert run_local(cfg).steps == 2

    changed = tmp_path / "c" / "chat.jsonl"
    changed.parent.mkdir()
    changed.write_bytes(moved.read_bytes().replace(b"trubble", b"trabble"))
    with pytest.raises(RunDirError, match=r"dataset files. content: .*c/chat.jsonl \(sha256 [0-9a-f]{12}\).* differ from the ones trained on"):
        run_local(_config(tmp_path, tiny_chat_target, changed, "training.resume=true", "training.max_steps=3"))
