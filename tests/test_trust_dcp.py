"""A sharded (fsdp2, torch.distributed.checkpoint) checkpoint never runs code from it.

A real fsdp2 checkpoint is written once (the real trainer on a real 1-rank gloo group); each test
plants a pickle payload into a copy, the way an attacker shipping a checkpoint would (its COMPLETE
marker rewritten to match), and loads it through ``specforge export`` and resume. The payload
creates a file when it is unpickled: the file must never appear.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_core import distributed
from specforge_core.cli import main
from specforge_core.config import dump_toml, load_config
from specforge_core.export import export_from_checkpoint
from specforge_core.target import target_info, with_aux_layers
from specforge_core.training import checkpoint as ckpt
from specforge_core.training import safe_dcp
from specforge_core.training.trainer import Trainer
from specforge_core.types import Sample
from specforge_core.vocab import build_vocab_mapping

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"
TARGET = ASSETS / "tiny-target"
DATA = ASSETS / "data" / "sample_chat.jsonl"
AUX = [1, 4, 6]  # of the 8-layer tiny target


class Payload:
    """Unpickling this runs ``open(path, 'w')``: the file appears iff the pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_config(out: Path, *overrides: str):
    return load_config(data={
        "run": {"name": "dcp", "output_dir": str(out), "seed": 3},
        "model": {"target": str(TARGET), "draft_vocab_size": 64, "aux_layers": AUX},
        "dataset": {"path": [str(DATA)], "max_samples": 4, "cache_dir": str(out / "cache")},
        "training": {"strategy": "fsdp2", "lr": 1e-2, "max_steps": 1,
                     "fsdp2": {"mixed_precision": False}},
        "logging": {"progress": False},
    }, overrides=list(overrides))


def vocab_mapping_path(cfg) -> Path:
    return Path(cfg.output_dir) / "vocab_mapping.safetensors"  # where a run keeps its mapping


def _trainer(cfg, vocab):
    return Trainer(cfg, target_info(str(TARGET), with_aux_layers(cfg).model.aux_layers), vocab, total_steps=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(run dir, config, vocab, bytes-item variant dir, lr): one fsdp2 step, checkpointed; and a copy
    whose optimizer ``param_groups`` item (a DCP byte item) holds a payload."""
    import torch.distributed.checkpoint as dcp
    from specforge_fsdp2.checkpoint import _SHARDED
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = tmp_path_factory.mktemp("dcp")
    out = root / "run"
    cfg = make_config(out)
    vocab_size = target_info(str(TARGET), AUX).vocab_size
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(4):
        mask = torch.zeros(20, dtype=torch.uint8)
        mask[6:] = 1
        samples.append(Sample(f"s{i}", torch.randint(3, vocab_size, (20,), generator=g), mask))
    vocab = build_vocab_mapping(samples, vocab_size, 64)
    vocab_mapping_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    vocab.save(str(vocab_mapping_path(cfg)))
    from specforge_core.registry import get_registry

    backend = get_registry().create_for(cfg, "target_backend", cfg, "cpu")
    feats = backend.generate(samples)
    backend.close()
    evil_bytes = root / "evil-bytes"
    distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        trainer = _trainer(cfg, vocab)
        trainer.train_step([feats[:2], feats[2:]])
        lr = trainer.optimizer.param_groups[0]["lr"]  # the scheduler's, after one step
        path = ckpt.save(trainer, cfg.output_dir, data_position={"epoch": 0, "index": 4},
                         config_toml=dump_toml(cfg), vocab_path=str(vocab_mapping_path(cfg)), keep=2)
        # the same state with a payload as a param group's lr: DCP stores it as a pickled byte item
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer, options=_SHARDED)
        optim_sd["param_groups"][0]["lr"] = Payload(str(root / "PWNED-bytes"))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(evil_bytes))
        shutil.copy(path / ckpt.EXTRA_JSON, evil_bytes)
        shutil.copy(path / ckpt.EXTRA_TENSORS, evil_bytes)
        ckpt.write_complete(evil_bytes)
    finally:
        distributed.destroy()
    assert (path / ckpt.DCP_METADATA).is_file() and not (root / "PWNED-bytes").exists()
    return out, cfg, vocab, evil_bytes, lr


def copy_run(base, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    return out


def plant_metadata(step: Path, marker: Path) -> None:
    """A payload inside ``.metadata`` (next to the real metadata), marker rewritten to match."""
    with open(step / ckpt.DCP_METADATA, "rb") as f:
        md = pickle.load(f)  # our own file, written by the fixture
    md.planner_data["evil"] = Payload(str(marker))
    with open(step / ckpt.DCP_METADATA, "wb") as f:
        pickle.dump(md, f)
    ckpt.write_complete(step)
    assert not marker.exists()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_planted_metadata_is_refused_on_export(base, tmp_path, capsys):
    out = copy_run(base, tmp_path)
    step = ckpt.latest_checkpoint(out)
    marker = tmp_path / "PWNED"
    plant_metadata(step, marker)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata .*io\.open.*refused unread"):
        export_from_checkpoint(make_config(out))
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(dump_toml(make_config(out)))
    capsys.readouterr()
    assert main(["export", str(cfg_file)]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(step / ".metadata") in line and "refused" in line and "weights_only" not in line
    assert not marker.exists()


def test_planted_metadata_is_refused_on_resume(base, tmp_path, capsys):
    out = copy_run(base, tmp_path)
    step = ckpt.latest_checkpoint(out)
    marker = tmp_path / "PWNED"
    plant_metadata(step, marker)
    cfg = make_config(out, "training.resume=true", "training.max_steps=2")
    # the run's own check, before any data is read or Ray is started
    from specforge_core import rundir

    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata"):
        rundir.check_resume(cfg, dump_toml(cfg), warn=lambda m: None)
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(dump_toml(make_config(out)))
    capsys.readouterr()
    assert main(["run", str(cfg_file), "training.resume=true", "training.max_steps=2"]) == 2
    assert str(step / ".metadata") in one_line(capsys.readouterr().err)
    # the Ray pipeline's driver refuses it before it starts Ray (the trainer actors never load it)
    ray = ["run.pipeline=ray", "transfer.store=shm", "training.num_gpus=1", "inference.num_gpus=1"]
    assert main(["run", str(cfg_file), "training.resume=true", "training.max_steps=2", *ray]) == 2
    assert str(step / ".metadata") in one_line(capsys.readouterr().err)
    # the trainer's load itself, on a real FSDP2 model (each rank reads and refuses it)
    distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        trainer = _trainer(cfg, base[2])
        before = {k: v.clone() for k, v in trainer.strategy.full_state_dict(trainer.model).items()}
        with pytest.raises(ckpt.CheckpointError, match=r"\.metadata .*refused unread"):
            ckpt.load(trainer, step)
        after = trainer.strategy.full_state_dict(trainer.model)
    finally:
        distributed.destroy()
    assert not marker.exists()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded


def test_a_payload_in_a_byte_item_is_refused(base, tmp_path, capsys):
    """Non-tensor items (the optimizer's param_groups) are read with weights_only=True."""
    evil = base[3]
    marker = evil.parent / "PWNED-bytes"
    safe_dcp.read_metadata(evil)  # the metadata itself is clean
    # export reads only the model's items (the payload stays unread); resume reads the optimizer's
    export_from_checkpoint(make_config(base[0]), checkpoint_dir=evil, out_dir=tmp_path / "x")
    distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        trainer = _trainer(make_config(base[0]), base[2])
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.load(trainer, evil)
    finally:
        distributed.destroy()
    msg = str(e.value)
    assert str(evil / "__0_0.distcp") in msg and "param_groups" in msg and "io.open" in msg, msg
    assert "refused unread" in msg and "weights_only" not in msg and "\n" not in msg
    assert not marker.exists()


def test_storage_outside_the_checkpoint_is_refused(base, tmp_path):
    out = copy_run(base, tmp_path)
    step = ckpt.latest_checkpoint(out)
    with open(step / ckpt.DCP_METADATA, "rb") as f:
        md = pickle.load(f)
    for info in md.storage_data.values():
        info.relative_path = "../../../etc/passwd"
    with open(step / ckpt.DCP_METADATA, "wb") as f:
        pickle.dump(md, f)
    ckpt.write_complete(step)
    with pytest.raises(ckpt.CheckpointError, match="outside the checkpoint directory"):
        export_from_checkpoint(make_config(out))


def test_a_clean_checkpoint_still_exports_and_resumes(base, tmp_path):
    out = copy_run(base, tmp_path)
    exported = load_file(str(export_from_checkpoint(make_config(out)) / "model.safetensors"))
    distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        trainer = _trainer(make_config(out), base[2])
        extra = ckpt.load(trainer, ckpt.latest_checkpoint(out))
        state = trainer.strategy.full_state_dict(trainer.model)
        lr = trainer.optimizer.param_groups[0]["lr"]
    finally:
        distributed.destroy()
    assert extra["step"] == 1 and lr == base[4] != 1e-2  # param_groups read back (as data)
    assert torch.equal(exported["fc.weight"], state["draft.fc.weight"].to(torch.bfloat16))


def test_metadata_that_would_change_a_class_is_refused(base, tmp_path):
    """Only allowed classes resolve, but BUILD on a class itself would set its attributes for the
    whole process: state is set only on instances."""
    from torch.distributed.checkpoint.metadata import Metadata

    out = copy_run(base, tmp_path)
    step = ckpt.latest_checkpoint(out)
    (step / ckpt.DCP_METADATA).write_bytes(  # Metadata class, BUILD (None, {"planted": 1}), STOP
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\nN}X\x07\x00\x00\x00plantedK\x01s\x86b.")
    ckpt.write_complete(step)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata holds state set on Metadata"):
        export_from_checkpoint(make_config(out))
    assert not hasattr(Metadata, "planted")
