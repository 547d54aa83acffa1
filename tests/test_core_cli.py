"""The CLI's own subcommands end to end: `specforge vocab` writes the mapping the pipeline would use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from specforge_core.vocab import VocabMapping

ROOT = Path(__file__).resolve().parents[1]


def test_vocab_command_writes_the_mapping(tmp_path):
    out = tmp_path / "vocab.safetensors"
    res = subprocess.run(
        [sys.executable, "-m", "specforge_core.cli", "vocab", "configs/quickstart.toml",
         f"dataset.cache_dir={tmp_path / 'cache'}", "model.draft_vocab_size=300", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout
    vocab = VocabMapping.load(str(out))
    assert vocab.d2t.numel() == 300 and vocab.t2d.numel() == 1856 and int(vocab.t2d.sum()) == 300
    ids = vocab.draft_to_target_ids
    assert torch.equal(ids, torch.sort(ids).values)  # ascending, as engines expect
    assert torch.equal(torch.nonzero(vocab.t2d).flatten(), ids)


def test_unknown_component_from_cli_lists_registered(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "specforge_core.cli", "config", "validate", "configs/quickstart.toml",
         "training.loss=kl"], cwd=ROOT, capture_output=True, text=True,
    )
    assert res.returncode == 2
    assert "command line: training.loss: no loss named 'kl'" in res.stderr and "forward-kl" in res.stderr
