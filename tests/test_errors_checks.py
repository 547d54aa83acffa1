"""`specforge run` and `specforge config validate` run the same checks before any work: each bad
input gives one line naming the key or file and what is allowed, and exit code 2 (issue 18, item 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from specforge_core import cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def _truncated_target(tmp_path: Path) -> Path:
    src = ROOT / "configs" / "assets" / "tiny-target"
    dst = tmp_path / "truncated-target"
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # an interrupted download
    return dst


CASES = {
    "seq-too-long": (["dataset.max_seq_length=100000000"], "dataset.max_seq_length: 100000000 exceeds"),
    "one-beta": (["training.betas=[0.9]"], "training.betas: [0.9]: AdamW takes two values"),
    "missing-data": (["dataset.path=['no-such-file.jsonl']"], "no-such-file.jsonl: data file not found"),
    "output-is-a-file": (["run.output_dir={file}"], "is a file; the run writes a directory there"),
    "missing-target": (["model.target={tmp}/nothing-here"], "nothing-here: no such directory"),
    "truncated-target": (["model.target={truncated}"], "model.safetensors: truncated"),
}


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the quickstart config names its files relative to the repository
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    overrides, expected = CASES[case]
    fill = {"file": a_file, "tmp": tmp_path,
            "truncated": _truncated_target(tmp_path) if case == "truncated-target" else ""}
    args = [QUICKSTART, f"run.output_dir={tmp_path / 'out'}", *[o.format(**fill) for o in overrides]]
    argv = ["run", *args] if command == "run" else ["config", "validate", *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or case == "output-is-a-file"  # nothing was started
