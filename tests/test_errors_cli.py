"""Errors reach users as one line (what, which file or key, what to do) and a non-zero exit;
``--debug`` shows the traceback (issue 18, item 9)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import specforge_core.pipeline as pipeline_mod
from specforge_core import cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_extends_of_a_missing_file_names_the_including_file(tmp_path, capsys):
    cfg = tmp_path / "mine.toml"
    cfg.write_text('extends = "base/missing.toml"\n')
    assert cli.main(["config", "validate", str(cfg)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(cfg) in line and "base/missing.toml" in line and "not found" in line


def _raising(exc):
    def run(*_args, **_kwargs):
        raise exc
    return run


def test_full_disk_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "run_pipeline",
                        _raising(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt"))))
    assert cli.main(["run", QUICKSTART, f"run.output_dir={tmp_path / 'out'}"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left on the device" in line and str(tmp_path / "ckpt") in line


def test_ctrl_c_of_the_local_run_prints_the_resume_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "run_pipeline", _raising(KeyboardInterrupt()))
    assert cli.main(["run", QUICKSTART, f"run.output_dir={tmp_path / 'out'}"]) == 130
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("interrupted: no complete checkpoint was written") and "training.resume=true" in line


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "run_pipeline", _raising(RuntimeError("engine exploded")))
    args = ["run", QUICKSTART, f"run.output_dir={tmp_path / 'out'}"]
    assert cli.main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == "error: RuntimeError: engine exploded (--debug shows the traceback)"
    with pytest.raises(RuntimeError, match="engine exploded"):
        cli.main(["--debug", *args])


def test_a_bad_data_line_under_stop_is_one_line_with_file_and_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n{oops\n')
    monkeypatch.chdir(ROOT)
    rc = cli.main(["run", QUICKSTART, f"run.output_dir={tmp_path / 'out'}", f"dataset.path=['{data}']",
                   "dataset.on_error='stop'", f"dataset.cache_dir={tmp_path / 'cache'}"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err.replace("\r", ""))
    assert line.startswith(f"error: {data}:2: invalid JSON")
