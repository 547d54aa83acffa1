"""#18: checkpoints that can be trusted, through the real local pipeline (tiny HF target, hf backend).

One base run (2 steps, a checkpoint after each) is trained once; each test works on its own copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_core import rundir
from specforge_core.config import dump_toml, load_config
from specforge_core.export import export_from_checkpoint
from specforge_core.pipeline.local import run_local
from specforge_core.training import checkpoint as ckpt

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(target dir, data file, cache dir, base run dir)."""
    from specforge_core.data import load_tokenizer
    from specforge_core.testing import make_tiny_model

    root = tmp_path_factory.mktemp("trust")
    target = root / "target"
    target.mkdir()
    for f in (ASSETS / "tiny-target").iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, target)
    make_tiny_model(target, vocab_size=len(load_tokenizer(str(target))))
    data = root / "chat.jsonl"
    lines = (ASSETS / "data" / "sample_chat.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:40]))
    base = root / "base"
    env = (target, data, root / "cache", base)
    r = run_local(make_config(env, base))
    assert r.steps == 2 and sorted(d.name for _, d in ckpt.step_dirs(base)) == ["step-000001", "step-000002"]
    return env


def make_config(env, out, *overrides, data=None):
    target, data_file, cache, _ = env
    cfg = {
        "run": {"name": "trust", "output_dir": str(out), "seed": 5},
        "model": {"target": str(target), "draft_vocab_size": 128, "llama-eagle3": {"ttt_length": 2}},
        "dataset": {"path": [str(data or data_file)], "max_samples": 8, "cache_dir": str(cache)},
        "training": {"max_steps": 2, "micro_batch_size": 2, "lr": 3e-3, "save_every": 1,
                     "keep_checkpoints": 2},
        "logging": {"progress": False},
    }
    return load_config(data=cfg, overrides=list(overrides))


def copy_base(env, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(env[3], out)
    return out


class Payload:
    """Unpickling this runs ``open(path, 'w')``: the file appears iff the pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(step_dir: Path, marker: Path) -> None:
    """What a malicious checkpoint looks like: a pickled extra.pt with a payload, and a marker
    rewritten to match (so only the loader's refusal stands between the payload and execution)."""
    extra = ckpt.read_extra(step_dir)
    extra["evil"] = Payload(str(marker))
    for name in (ckpt.EXTRA_JSON, ckpt.EXTRA_TENSORS):
        (step_dir / name).unlink()
    torch.save(extra, step_dir / ckpt.LEGACY_EXTRA)
    assert not marker.exists()  # saving does not run it
    ckpt.write_complete(step_dir)


def test_planted_pickle_is_refused_on_export_and_resume(env, tmp_path, capsys):
    from specforge_core.cli import main

    out = copy_base(env, tmp_path)
    marker = tmp_path / "PWNED"
    plant(out / "checkpoints" / "step-000002", marker)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        export_from_checkpoint(make_config(env, out))
    # through the CLI: one error line, non-zero exit
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(dump_toml(make_config(env, out)))
    capsys.readouterr()
    assert main(["export", str(cfg_file)]) == 2  # a refused checkpoint is an input error
    err = capsys.readouterr().err
    assert "extra.pt" in err and "refused" in err and len(err.strip().splitlines()) == 1
    assert main(["run", str(cfg_file), "training.resume=true", "training.max_steps=3"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    # a payload in optimizer.pt is refused as well (read with weights_only=True)
    step1 = out / "checkpoints" / "step-000001"
    torch.save({"state": {}, "param_groups": [], "evil": Payload(str(marker))}, step1 / "optimizer.pt")
    ckpt.write_complete(step1)
    shutil.rmtree(out / "checkpoints" / "step-000002")
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        run_local(make_config(env, out, "training.resume=true", "training.max_steps=3"))
    assert not marker.exists()


def test_extra_is_data_and_plain_legacy_extra_still_reads(env, tmp_path):
    step = env[3] / "checkpoints" / "step-000002"
    assert not (step / ckpt.LEGACY_EXTRA).exists()
    json.loads((step / ckpt.EXTRA_JSON).read_text())  # plain JSON
    extra = ckpt.read_extra(step)
    assert extra["step"] == 2 and extra["data_position"] == {"epoch": 0, "index": 4}
    # an older checkpoint whose pickle holds plain data only loads with weights_only=True
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"step": 2, "rng": {"python": extra["rng"]["python"], "torch": extra["rng"]["torch"]}},
               legacy / ckpt.LEGACY_EXTRA)
    back = ckpt.read_extra(legacy)
    assert back["step"] == 2 and torch.equal(back["rng"]["torch"], extra["rng"]["torch"])


def test_fresh_run_refuses_a_directory_with_another_runs_checkpoints(env, tmp_path):
    out = copy_base(env, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    with pytest.raises(rundir.RunDirError) as e:
        run_local(make_config(env, out, "training.max_steps=1"))
    msg = str(e.value)
    assert str(out) in msg and "training.resume = true" in msg and "run.output_dir" in msg
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before


def test_pruning_only_touches_this_runs_checkpoints(env, tmp_path):
    out = copy_base(env, tmp_path)
    other = tmp_path / "other"
    run_local(make_config(env, other, "training.max_steps=1", "run.seed=9"))
    # a checkpoint of another run lands in this directory (step 1 < this run's step 2)
    shutil.rmtree(out / "checkpoints" / "step-000001")
    shutil.copytree(other / "checkpoints" / "step-000001", out / "checkpoints" / "step-000001")
    r = run_local(make_config(env, out, "training.resume=true", "training.max_steps=4",
                              "training.keep_checkpoints=1"))
    assert r.steps == 4
    names = sorted(d.name for _, d in ckpt.step_dirs(out))
    assert names == ["step-000001", "step-000004"]  # this run's 2 and 3 pruned, the other's kept
    assert ckpt.read_extra(out / "checkpoints" / "step-000001")["run_id"] == rundir.run_id(other)


def test_export_uses_the_trained_vocab_mapping(env, tmp_path, capsys):
    from specforge_core.cli import main

    out = copy_base(env, tmp_path)
    trained = load_file(str(out / "export" / "model.safetensors"))["d2t"]
    # `specforge vocab` on other data overwrites the run dir's mapping
    other_data = tmp_path / "other.jsonl"
    lines = (ASSETS / "data" / "sample_chat.jsonl").read_text().splitlines(keepends=True)
    other_data.write_text("".join(lines[200:260]))
    cfg_file = tmp_path / "vocab.toml"
    cfg_file.write_text(dump_toml(make_config(env, out, data=other_data)))
    assert main(["vocab", str(cfg_file), "dataset.max_samples=60"]) == 0
    rewritten = load_file(str(out / "vocab_mapping.safetensors"))["d2t"]
    assert not torch.equal(rewritten, trained)  # the test means something: the mapping did change
    shutil.rmtree(out / "export")
    capsys.readouterr()
    exported = export_from_checkpoint(make_config(env, out))
    assert torch.equal(load_file(str(exported / "model.safetensors"))["d2t"], trained)
    assert "exporting the trained one" in capsys.readouterr().out


def test_resume_refuses_changed_data_and_warns_on_changed_lr(env, tmp_path, capsys):
    out = copy_base(env, tmp_path)
    data = env[1]
    original = data.read_text()
    try:
        lines = original.splitlines(keepends=True)
        data.write_text("".join(lines[1:] + lines[:1]))  # same records, other order: other content
        with pytest.raises(rundir.RunDirError, match="dataset files' content") as e:
            run_local(make_config(env, out, "training.resume=true", "training.max_steps=3"))
        assert str(data) in str(e.value)
    finally:
        data.write_text(original)
    with pytest.raises(rundir.RunDirError, match=r"model\.draft_vocab_size: 128 -> 64"):
        run_local(make_config(env, out, "training.resume=true", "model.draft_vocab_size=64"))
    with pytest.raises(rundir.RunDirError, match=r"model\.llama-eagle3\.ttt_length"):
        run_local(make_config(env, out, "training.resume=true", "model.llama-eagle3.ttt_length=3"))
    assert ckpt.latest_checkpoint(out).name == "step-000002"  # refused before any work
    capsys.readouterr()
    r = run_local(make_config(env, out, "training.resume=true", "training.max_steps=3", "training.lr=1e-3"))
    assert r.steps == 3 and len(r.history) == 1
    printed = capsys.readouterr().out
    assert "training.lr: 0.003 -> 0.001" in printed and "training.max_steps: 2 -> 3" in printed


def test_damaged_newest_checkpoint_falls_back(env, tmp_path, capsys):
    base_step1 = load_file(str(env[3] / "checkpoints" / "step-000001" / "model.safetensors"))
    base_step2 = load_file(str(env[3] / "checkpoints" / "step-000002" / "model.safetensors"))
    # optimizer.pt deleted: export still uses step 2, resume falls back to step 1 with a warning
    out = copy_base(env, tmp_path)
    (out / "checkpoints" / "step-000002" / "optimizer.pt").unlink()
    exported = load_file(str(export_from_checkpoint(make_config(env, out), out_dir=tmp_path / "e1")
                             / "model.safetensors"))
    assert torch.equal(exported["fc.weight"], base_step2["fc.weight"].to(exported["fc.weight"].dtype))
    capsys.readouterr()
    r = run_local(make_config(env, out, "training.resume=true"))
    printed = capsys.readouterr().out
    assert "step-000002 is damaged (optimizer.pt is missing)" in printed
    assert "resumed from" in printed and "step-000001" in printed and r.steps == 2 and len(r.history) == 1
    # a truncated model file: export and resume both fall back to step 1
    out2 = tmp_path / "run2"
    shutil.copytree(env[3], out2)
    model = out2 / "checkpoints" / "step-000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.warns(ckpt.CheckpointWarning, match="model.safetensors has 1000 bytes"):
        exported = load_file(str(export_from_checkpoint(make_config(env, out2), out_dir=tmp_path / "e2")
                                 / "model.safetensors"))
    assert torch.equal(exported["fc.weight"], base_step1["fc.weight"].to(exported["fc.weight"].dtype))
    bf16 = exported["fc.weight"].dtype
    assert not torch.equal(base_step1["fc.weight"].to(bf16), base_step2["fc.weight"].to(bf16))


def test_checkpoints_hold_no_frozen_params(env):
    from specforge_core.target import target_info, with_aux_layers
    from specforge_core.training.components import algorithm
    from specforge_core.vocab import VocabMapping

    cfg = make_config(env, env[3])
    draft = algorithm(cfg).build(target_info(cfg.model.target, with_aux_layers(cfg).model.aux_layers),
                                 VocabMapping.load(env[3] / "vocab_mapping.safetensors"))
    frozen = {n for n, p in draft.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert frozen  # the target embedding
    saved = set(load_file(str(env[3] / "checkpoints" / "step-000002" / "model.safetensors")))
    assert not (saved & frozen) and trainable <= saved


def test_ray_pipeline_applies_the_same_directory_and_resume_checks(env, tmp_path):
    """The Ray driver claims the directory and checks a resume before it starts Ray."""
    from specforge_core.pipeline.ray_pipeline import run_ray

    out = copy_base(env, tmp_path)
    with pytest.raises(rundir.RunDirError, match="already holds checkpoints"):
        run_ray(make_config(env, out, "run.pipeline=ray"))
    with pytest.raises(rundir.RunDirError, match=r"model\.llama-eagle3\.ttt_length: 2 -> 3"):
        run_ray(make_config(env, out, "run.pipeline=ray", "training.resume=true", "model.llama-eagle3.ttt_length=3"))
    with rundir.lock(out):
        with pytest.raises(rundir.RunDirError, match="in use by another specforge run"):
            run_ray(make_config(env, out, "run.pipeline=ray", "training.resume=true"))
