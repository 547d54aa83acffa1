"""A full disk while saving a checkpoint: one error line naming the checkpoint and the cause, and
the previous checkpoint intact.

The disk is really full: the run's output dir lives on a tmpfs a little larger than what it holds
plus half a checkpoint, mounted in a private mount namespace (``unshare -rm``: no root needed where
unprivileged user namespaces are allowed; the mount vanishes with the process).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from specforge_core.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
PAGE = 4096


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare -rm) for a "
                                "real full tmpfs")


def _pages(d: Path) -> int:
    """Bytes ``d`` takes on a tmpfs (whole pages per file, one per directory)."""
    return sum((-(-f.stat().st_size // PAGE) if f.is_file() else 1) * PAGE for f in d.rglob("*"))


def _digest(d: Path) -> dict[str, str]:
    return {f.relative_to(d).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file()}


def _in_namespace(mnt: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a private mount namespace where it may mount a tmpfs on ``mnt``."""
    mnt.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_full_disk_at_a_local_checkpoint_names_it_and_keeps_the_previous(tmp_path):
    from specforge_core.cli import main

    base = tmp_path / "base"
    common = [f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.max_samples=8", "training.save_every=1",
              "logging.progress=false"]
    assert main(["run", str(QUICKSTART), f"run.output_dir={base}", "training.max_steps=1", *common]) == 0
    shutil.rmtree(base / "export", ignore_errors=True)  # only what a resume needs goes on the small disk
    step1 = ckpt.checkpoint_dir(base, 1)
    before = _digest(step1)
    # room for what is there and half a checkpoint: step 2's checkpoint cannot fit
    size = _pages(base) + _pages(step1) // 2
    mnt, after = tmp_path / "disk", tmp_path / "after"
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && cp -a {base}/. {mnt}/ && {sys.executable} -m specforge_core.cli run {QUICKSTART} "
              f"run.output_dir={mnt} training.resume=true training.max_steps=2 {' '.join(common)} "
              f"2>{tmp_path / 'err'}; echo $? >{tmp_path / 'rc'}; cp -a {mnt}/. {after}/")
    res = _in_namespace(mnt, script)
    assert res.returncode == 0, res.stderr
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", err
    line = _error_line(err)
    assert str(mnt / "checkpoints" / "step-000002") in line, line
    assert "no space left on the device" in line and "step-000001 is intact" in line, line
    kept = after / "checkpoints" / "step-000001"
    assert ckpt.problems(kept) == [] and _digest(kept) == before
    assert sorted(p.name for p in (after / "checkpoints").iterdir()) == ["step-000001"]  # no temp left


FSDP2_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    sys.path.insert(0, {tests!r})
    import torch
    from specforge_core.distributed import destroy, init_process_group
    from specforge_core.training import checkpoint as ckpt
    from specforge_fsdp2.strategy import FSDP2Options, make_fsdp2
    import test_fsdp2_strategy as t

    mnt, out = {mnt!r}, {out!r}
    init_process_group("gloo", 0, 1)
    s = make_fsdp2(FSDP2Options(mixed_precision=False), None)
    model = s.prepare(t.new_model())
    opt = t.optimizer(model)
    t.train(model, opt, range(1), 0, 1, strategy=s)
    probe = os.path.join(out, "probe", "checkpoints", "step-000001")
    ckpt.write_checkpoint(s, probe, model, opt, {{"step": 1}})
    size = sum(-(-os.path.getsize(os.path.join(r, f)) // 4096) * 4096 for r, _, fs in os.walk(probe) for f in fs)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={{size * 3 // 2 + 4 * 4096}}", "tmpfs", mnt], check=True)
    ckpt.write_checkpoint(s, os.path.join(mnt, "checkpoints", "step-000001"), model, opt, {{"step": 1}})
    before = ckpt.problems(os.path.join(mnt, "checkpoints", "step-000001"))
    t.train(model, opt, range(1, 2), 0, 1, strategy=s)
    result = {{"before": before}}
    try:
        ckpt.write_checkpoint(s, os.path.join(mnt, "checkpoints", "step-000002"), model, opt, {{"step": 2}})
    except OSError as exc:
        result.update(errno=exc.errno, filename=exc.filename, message=str(exc))
    result["after"] = ckpt.problems(os.path.join(mnt, "checkpoints", "step-000001"))
    result["left"] = sorted(os.listdir(os.path.join(mnt, "checkpoints")))
    destroy()
    json.dump(result, open(os.path.join(out, "result.json"), "w"))
""")


def test_full_disk_at_an_fsdp2_checkpoint_names_it_and_keeps_the_previous(tmp_path):
    import errno

    mnt = tmp_path / "disk"
    script_file = tmp_path / "save.py"
    script_file.write_text(FSDP2_SCRIPT.format(tests=str(ROOT / "tests"), mnt=str(mnt), out=str(tmp_path)))
    res = _in_namespace(mnt, f"{sys.executable} {script_file}")  # it mounts the tmpfs once it knows the size
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["before"] == [] and result["after"] == [], result
    assert result.get("errno") == errno.ENOSPC, result
    assert result["filename"] == str(mnt / "checkpoints" / "step-000002"), result
    assert "no space left on the device" in result["message"] and "step-000001 is intact" in result["message"]
    assert result["left"] == ["step-000001"], result  # the failed save's temp dir is gone
