"""#18.10: exit codes agree with docs/guarantees.md: the user's input (config, output directory,
checkpoint) exits 2 with one line, a fault while running exits 1."""

from __future__ import annotations

import re
from pathlib import Path

from specforge_core import cli, rundir
from specforge_core.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_output_dir_held_by_another_run_or_holding_its_checkpoints_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    with rundir.lock(out):  # a second open file description: flock refuses it as for another process
        assert cli.main(["run", QUICKSTART, f"run.output_dir={out}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: output_dir {out} is in use by another specforge run") and "RunDirError" not in line
    (out / "checkpoints" / "step-000005").mkdir(parents=True)
    assert cli.main(["run", QUICKSTART, f"run.output_dir={out}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "already holds checkpoints" in line and "training.resume = true" in line


def test_a_checkpoint_that_cannot_be_read_exits_2_naming_it(tmp_path, capsys):
    step = tmp_path / "out" / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"not a checkpoint")
    ckpt.write_complete(step)  # complete, but without its extra state
    assert cli.main(["export", QUICKSTART, f"run.output_dir={tmp_path / 'out'}", "--checkpoint", str(step)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint {step}") and "extra" in line


def test_the_documented_table_lists_these_codes():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    rows = [(code, what) for code, what in re.findall(r"^\| (\d+) \| ([^|]+)\|", text, flags=re.M)]
    assert any(code == "2" and "output_dir" in what for code, what in rows), rows
    assert any(code == "2" and "checkpoint" in what for code, what in rows), rows
    assert any(code == "1" and "OSError" in what for code, what in rows), rows
