"""Small trust fixes: errors torch raises as ``BaseException`` end a command as one line; refusals
do not quote torch's advice to load with ``weights_only=False``; a skipped checkpoint without its
marker is named; ``section.key`` without ``=`` is an override missing its value; a library's log
record is printed once; the README's commands work in the order written."""

from __future__ import annotations

import errno
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from specforge_core import cli
from specforge_core.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _checkpoint_exception(inner: BaseException) -> BaseException:
    """What torch.distributed.checkpoint raises: a BaseException carrying each rank's error."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise inner
    except BaseException as exc:  # noqa: BLE001 - wrapped with its traceback, as torch does
        return CheckpointException("load", {0: _wrap_exception(exc)})


@pytest.mark.parametrize("inner, code, words", [
    (ckpt.CheckpointError("checkpoint /x/step-000002 is refused"), 2, ["checkpoint /x/step-000002 is refused"]),
    (OSError(errno.ENOSPC, "No space left on device", "/x/step-000002.tmp-1"), 1,
     ["/x/step-000002.tmp-1", "no space left on the device"]),
    (RuntimeError("Missing key in checkpoint state_dict: model.fc.weight\nmore"), 1,
     ["RuntimeError: Missing key in checkpoint state_dict: model.fc.weight"]),
])
def test_a_checkpoint_exception_is_one_line_with_the_usual_exit_code(monkeypatch, capsys, inner, code, words):
    exc = _checkpoint_exception(inner)
    assert not isinstance(exc, Exception)  # why `except Exception` let it through as a traceback

    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_export", fail)
    assert cli.main(["export", QUICKSTART]) == code
    line = _one_line(capsys.readouterr().err)
    assert all(w in line for w in words), line
    with pytest.raises(type(exc)):
        cli.main(["--debug", "export", QUICKSTART])


def test_an_override_without_a_value_is_named_as_such(capsys):
    assert cli.main(["config", "validate", QUICKSTART, "training.lr"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "training.lr=VALUE" in line and "not found" not in line, line
    assert cli.main(["config", "validate", "no-such-config.toml"]) == 2  # a file is still a file
    assert "config file not found" in capsys.readouterr().err


def test_the_optimizer_refusal_does_not_advise_weights_only_false(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    torch.save({"state": {}, "param_groups": [], "x": Payload()}, tmp_path / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_optimizer_state(tmp_path / "optimizer.pt")
    msg = str(e.value)
    assert str(tmp_path / "optimizer.pt") in msg and "refused unread" in msg and "io.open" in msg, msg
    assert "weights_only" not in msg and "\n" not in msg and not (tmp_path / "PWNED").exists()


def _fake_checkpoint(d: Path, complete: bool) -> None:
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 10)
    if complete:
        ckpt.write_complete(d)


def test_a_checkpoint_without_its_marker_is_named_when_skipped(tmp_path):
    _fake_checkpoint(ckpt.checkpoint_dir(tmp_path, 1), complete=True)
    _fake_checkpoint(ckpt.checkpoint_dir(tmp_path, 2), complete=False)  # e.g. copied without COMPLETE
    said: list[str] = []
    assert ckpt.latest_checkpoint(tmp_path, report=said.append) == ckpt.checkpoint_dir(tmp_path, 1)
    assert len(said) == 1 and str(ckpt.checkpoint_dir(tmp_path, 2)) in said[0] and "COMPLETE" in said[0], said
    with pytest.warns(ckpt.CheckpointWarning, match="step-000002 has no COMPLETE marker"):
        ckpt.latest_checkpoint(tmp_path)


def test_a_library_log_record_is_printed_once(tmp_path):
    """huggingface_hub's logger has its own stderr handler and propagates to the CLI's root handler."""
    script = textwrap.dedent(f"""
        from huggingface_hub.utils import logging as hf_logging
        from specforge_core import cli

        def show(args):
            hf_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
            return 0

        cli.cmd_config_show = show
        raise SystemExit(cli.main(["config", "show", {QUICKSTART!r}]))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("Retrying in 1s") == 1, res.stderr


# ------------------------------------------------------------------------------------ README
def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_says_how_to_get_a_cpu_torch_before_installing():
    text = _readme()
    advice, install = text.find("CPU build of torch"), text.find("pip install -e .")
    assert 0 <= advice < install, "the CPU-torch advice must come before `pip install -e .`"


def test_readme_runs_of_different_targets_use_different_output_dirs():
    """A command that trains another target must not land in a directory an earlier command filled
    (a fresh run refuses another run's checkpoints)."""
    from specforge_core.config import load_config

    by_dir: dict[str, set[str]] = {}
    commands = re.findall(r"(?:^|&&\s*)specforge run (\S+\.toml)([^\n#&]*)", _readme(), flags=re.M)
    assert len(commands) >= 3, commands
    for config, rest in commands:
        overrides = [a for a in shlex.split(rest) if "=" in a]
        cfg = load_config([ROOT / config], overrides=overrides)
        by_dir.setdefault(str(cfg.output_dir), set()).add(cfg.model.target)
    shared = {d: t for d, t in by_dir.items() if len(t) > 1}
    assert not shared, f"README runs of different targets share an output dir: {shared}"


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, also inside functions (``from a import b`` gives a and a.b)."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_checkpoints_do_not_import_the_run_dir_module():
    """rundir reads checkpoints (claim, resume checks); checkpoint.py takes what it records about the
    run from provenance.py, so the two modules do not import each other."""
    core = ROOT / "specforge_core"
    assert "specforge_core.rundir" not in _imported(core / "training" / "checkpoint.py")
    assert "specforge_core.rundir" not in _imported(core / "provenance.py")
    assert "specforge_core.training.checkpoint" in _imported(core / "rundir.py")
