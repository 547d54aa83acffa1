"""'local' training strategy: dtype policy, atomic checkpoints, crash safety."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from specforge_defaults.strategy import LocalStrategy, LocalStrategyOptions

from specforge_core.config.schema import SpecforgeConfig


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6).requires_grad_(False)  # frozen, like the draft's
        self.fc = torch.nn.Linear(6, 6)
        self.lm_head = torch.nn.Linear(6, 5, bias=False)
        self.register_buffer("inv_freq", torch.tensor([1.0, 1e-4]) / 3, persistent=False)

    def forward(self, ids):
        return self.lm_head(torch.relu(self.fc(self.embed(ids))))


def trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(torch.randint(0, 11, (4, 3))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def strategy(dtype="auto", master_weights="fp32"):
    config = SpecforgeConfig()
    config.training.dtype = dtype
    return LocalStrategy(LocalStrategyOptions(device="cpu", master_weights=master_weights), config)


def test_prepare_dtype_policy():
    s = strategy()
    assert s.rank == 0 and s.world_size == 1 and s.device == torch.device("cpu")
    m = s.prepare(Tiny())
    assert all(p.dtype == torch.float32 for p in m.parameters())  # auto on CPU = fp32
    # bf16 compute: fp32 master copies of what the optimizer updates, the frozen embedding in bf16
    m = strategy("bf16").prepare(Tiny())
    assert m.embed.weight.dtype == torch.bfloat16 and not m.embed.weight.requires_grad
    assert m.lm_head.weight.dtype == torch.float32 and m.fc.bias.dtype == torch.float32
    assert m.inv_freq.dtype == torch.float32  # buffers keep their precision
    m = strategy("bf16", master_weights="bf16").prepare(Tiny())
    assert m.embed.weight.dtype == torch.bfloat16 and m.lm_head.weight.dtype == torch.bfloat16


def test_fp32_master_weights_keep_small_updates_that_bf16_rounds_away():
    """lr 1e-4 AdamW steps are ~1e-4 absolute: below half a bf16 ulp of weights near 1, so bf16
    parameters do not move at all, while fp32 masters do."""
    moved = {}
    for master in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = strategy("bf16", master_weights=master).prepare(Tiny())
        with torch.no_grad():
            m.fc.weight.fill_(1.0)
        before = m.fc.weight.detach().float().clone()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(torch.randint(0, 11, (4, 3))).float().square().mean()
        loss.backward()
        opt.step()
        moved[master] = float((m.fc.weight.detach().float() - before).abs().max())
    assert moved["bf16"] == 0.0
    assert 5e-5 < moved["fp32"] < 2e-4


def test_clip_and_identity_ops():
    s = strategy()
    model = Tiny()
    model(torch.tensor([[1, 2]])).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert s.clip_grad_norm(model, 0.0) == pytest.approx(norm)  # 0 = off: report, do not scale
    assert s.clip_grad_norm(model, norm / 2) == pytest.approx(norm)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert clipped == pytest.approx(norm / 2, rel=1e-4)
    t = torch.tensor([3.0])
    assert s.all_reduce(t) is t
    with s.no_sync(model):
        pass
    sd = s.full_state_dict(model)
    assert all(v.device.type == "cpu" for v in sd.values())
    assert torch.equal(sd["fc.weight"], model.fc.weight)
    assert sd["fc.weight"].data_ptr() != model.fc.weight.data_ptr()


def test_save_load_round_trip(tmp_path):
    s = strategy()
    model, opt = trained(0)
    extra = {"step": 3, "rng": torch.get_rng_state(), "sched": {"last_epoch": 3}}
    path = str(tmp_path / "ckpt" / "step-3")
    s.save_checkpoint(path, model, opt, extra)
    # extra is data (JSON + safetensors), never a pickle
    assert sorted(os.listdir(path)) == ["COMPLETE", "extra.json", "extra.safetensors", "model.safetensors",
                                        "optimizer.pt"]
    assert os.listdir(tmp_path / "ckpt") == ["step-3"]  # no temp dirs left

    model2, opt2 = trained(1)  # different weights and optimizer state
    got = s.load_checkpoint(path, model2, opt2)
    assert got["step"] == 3 and got["sched"] == {"last_epoch": 3} and torch.equal(got["rng"], extra["rng"])
    # frozen params (the target embedding) are not saved: they come from the target on load
    from safetensors.torch import load_file

    assert "embed.weight" not in load_file(os.path.join(path, "model.safetensors"))
    model2.embed.weight.data.copy_(model.embed.weight)  # what rebuilding from the target does
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][name], sb["state"][i][name]), (i, name)
    # and training continues identically from the restored state
    x = torch.randint(0, 11, (4, 3))
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().mean().backward()
        o.step()
    assert torch.equal(model.fc.weight, model2.fc.weight)


def test_overwrite_existing_checkpoint(tmp_path):
    s = strategy()
    path = str(tmp_path / "latest")
    m1, o1 = trained(0, steps=1)
    s.save_checkpoint(path, m1, o1, {"step": 1})
    m2, o2 = trained(0, steps=2)
    s.save_checkpoint(path, m2, o2, {"step": 2})
    assert os.listdir(tmp_path) == ["latest"]
    m3, o3 = trained(5)
    assert s.load_checkpoint(path, m3, o3)["step"] == 2
    assert torch.equal(m3.fc.weight, m2.fc.weight)


def test_exception_mid_write_keeps_previous(tmp_path, monkeypatch):
    s = strategy()
    path = str(tmp_path / "latest")
    m1, o1 = trained(0, steps=1)
    s.save_checkpoint(path, m1, o1, {"step": 1})

    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full (injected)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    m2, o2 = trained(0, steps=2)
    with pytest.raises(OSError, match="injected"):
        s.save_checkpoint(path, m2, o2, {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["latest"]  # the failed temp dir was removed
    m3, o3 = trained(5)
    assert s.load_checkpoint(path, m3, o3)["step"] == 1
    assert torch.equal(m3.fc.weight, m1.fc.weight)


def _crash_while_saving(path):
    """Child process: die hard (no cleanup, no finally) while writing optimizer.pt."""
    import torch as t
    from specforge_defaults.strategy import LocalStrategy, LocalStrategyOptions

    real_save = t.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            with open(f, "wb") as fh:
                fh.write(b"partial")
            os._exit(3)
        return real_save(obj, f, *a, **k)

    t.save = dying_save
    model, opt = trained(0, steps=2)
    LocalStrategy(LocalStrategyOptions(device="cpu")).save_checkpoint(path, model, opt, {"step": 2})


def test_hard_crash_leaves_previous_intact(tmp_path):
    s = strategy()
    path = str(tmp_path / "latest")
    m1, o1 = trained(0, steps=1)
    s.save_checkpoint(path, m1, o1, {"step": 1})

    proc = mp.get_context("spawn").Process(target=_crash_while_saving, args=(path,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3

    leftovers = [d for d in os.listdir(tmp_path) if d != "latest"]
    assert len(leftovers) == 1 and leftovers[0].startswith("latest.tmp-")
    tmp_dir = tmp_path / leftovers[0]
    assert "COMPLETE" not in os.listdir(tmp_dir) and "optimizer.pt" in os.listdir(tmp_dir)
    m3, o3 = trained(5)
    with pytest.raises(RuntimeError, match="incomplete.*no COMPLETE marker"):
        s.load_checkpoint(str(tmp_dir), m3, o3)
    assert s.load_checkpoint(path, m3, o3)["step"] == 1
    assert torch.equal(m3.fc.weight, m1.fc.weight)
    # the next save sweeps the crashed temp dir
    s.save_checkpoint(path, m3, o3, {"step": 4})
    assert os.listdir(tmp_path) == ["latest"]


def test_crash_between_renames_is_recovered(tmp_path):
    """If only '<path>.old-*' exists (crash after moving the old copy aside), load brings it back."""
    s = strategy()
    path = str(tmp_path / "latest")
    m1, o1 = trained(0, steps=1)
    s.save_checkpoint(path, m1, o1, {"step": 1})
    os.rename(path, path + ".old-deadbeef")
    assert s.load_checkpoint(path, *trained(5))["step"] == 1
    assert os.listdir(tmp_path) == ["latest"]
