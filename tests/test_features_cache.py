"""Offline feature cache (issue 16 part 3): `specforge data features` + the `disk` transfer store.

The quickstart's tiny 8-layer Llama target runs in bf16 (what a GPU run uses), one sample per target
forward, so the online run and the cache see bit-identical features.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from specforge_defaults import fp8

from specforge_core.config import ConfigError, load_config
from specforge_core.data.features import FeatureCacheError, read_index, write_features
from specforge_core.pipeline.local import run_local

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
# fp8 cache vs bf16 cache: final-loss tolerance (relative) of the same short run (docs/data.md)
FP8_LOSS_RTOL = 0.02


def _overrides(tmp_path: Path, store: str, n: int = 16, fmt: str = "bf16", shard: int = 4) -> list[str]:
    return [
        f"run.output_dir={tmp_path / ('run-' + store + '-' + fmt)}", f"dataset.max_samples={n}",
        "inference.dtype=bf16", "inference.batch_size=1", "logging.progress=false",
        "training.num_epochs=2", "training.save_every=0", f"dataset.cache_dir={tmp_path / 'tok'}",
        f"transfer.store={store}", f"transfer.disk.dir={tmp_path / ('cache-' + fmt)}",
        f"transfer.disk.format={fmt}", f"transfer.disk.shard_samples={shard}",
    ]


def _config(tmp_path: Path, store: str, **kw):
    return load_config([QUICKSTART], overrides=_overrides(tmp_path, store, **kw))


def test_training_from_bf16_cache_equals_the_online_run(tmp_path):
    online = run_local(_config(tmp_path, "local"))
    cfg = _config(tmp_path, "disk")
    summary = write_features(cfg)
    assert summary.samples == 16 and summary.shards == 4 and read_index(summary.cache_dir)["complete"]
    cached = run_local(load_config([QUICKSTART], overrides=_overrides(tmp_path, "disk") + [
        f"run.output_dir={tmp_path / 'run-cached'}"]))
    assert [m["loss"] for m in cached.history] == [m["loss"] for m in online.history]
    assert [m["acc_0"] for m in cached.history] == [m["acc_0"] for m in online.history]
    assert len(online.history) == 4  # 16 samples, 8 per step, 2 epochs


def test_run_from_cache_does_not_build_the_target_backend(tmp_path, monkeypatch):
    cfg = _config(tmp_path, "disk", n=8)
    write_features(cfg)
    from specforge_core.pipeline import local as components  # where the local pipeline builds components

    real = components.create

    def guarded(config, kind, *a, **k):
        if kind == "target_backend":
            raise AssertionError("the target backend was built")
        return real(config, kind, *a, **k)

    monkeypatch.setattr(components, "create", guarded)
    res = run_local(_config(tmp_path, "disk", n=8))
    assert res.steps == 2 and res.export_dir is not None


def test_mismatching_fingerprint_and_missing_cache_are_refused(tmp_path):
    write_features(_config(tmp_path, "disk", n=8))
    with pytest.raises(FeatureCacheError, match=r"other settings \(max_samples: cache 8, config 12"):
        write_features(_config(tmp_path, "disk", n=12))
    # the run's checks refuse both before any work (a ConfigError carrying the cache's line)
    with pytest.raises((FeatureCacheError, ConfigError), match="other settings"):
        run_local(_config(tmp_path, "disk", n=12))
    with pytest.raises((FeatureCacheError, ConfigError), match="no index.json"):
        run_local(load_config([QUICKSTART], overrides=_overrides(tmp_path, "disk", n=8) + [
            f"transfer.disk.dir={tmp_path / 'empty'}"]))
    with pytest.raises(ValueError, match="does not supply features"):
        write_features(_config(tmp_path, "local", n=8))


def test_fp8_rows_are_within_e4m3_bound():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes, outliers, zeros: the per-row scale must cover each
    x = torch.randn(64, 384, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)
    x[5, 17] = 1e4
    x[7] = 0
    q, scale = fp8.encode_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    y = fp8.decode_rows(q, scale, torch.float32)
    bound = torch.maximum(fp8.ROW_RELATIVE_BOUND * x.abs(), fp8.SUBNORMAL_ABS_BOUND * scale) * (1 + 1e-6)
    assert torch.all((y - x).abs() <= bound)
    assert torch.equal(y[7], x[7])  # zero rows decode exactly
    # the bound is tight: rounding does use most of it (not a vacuous check)
    assert ((y - x).abs() / x.abs().clamp(min=1e-30))[x.abs() > scale * 2**-6].max() > 0.05
    # the largest magnitude of each row is kept to e4m3 precision
    amax = x.abs().amax(1)
    assert torch.allclose(y.abs().amax(1), amax, rtol=2**-4)


def test_fp8_bytes_per_token_and_loss_within_tolerance_of_bf16(tmp_path):
    runs = {}
    for fmt in ("bf16", "fp8"):
        cfg = _config(tmp_path, "disk", fmt=fmt)
        s = write_features(cfg)
        runs[fmt] = (s, run_local(cfg))
    H, n_aux = 128, 3
    # ids (int64) + mask (uint8) + argmax (int64) = 17 B; hidden: bf16 2 B per value, fp8 1 B + 4 B scale per tensor
    assert read_index(runs["bf16"][0].cache_dir)["format"] == "bf16"
    bpt = {fmt: s.bytes_per_token for fmt, (s, _) in runs.items()}
    hidden_tokens = runs["bf16"][0].tokens
    expect = {"bf16": 17 + 2 * (n_aux + 1) * H, "fp8": 17 + (n_aux + 1) * H + 2 * 4}
    for fmt in bpt:  # the safetensors header and offsets add a little per shard
        assert expect[fmt] <= bpt[fmt] <= expect[fmt] + 4096 * 4 / hidden_tokens
    from specforge_core.plan import build_plan

    for fmt in bpt:  # `specforge plan` sizes the cache with the same codec
        assert build_plan(_config(tmp_path, "disk", fmt=fmt))["disk"]["bytes_per_token"] == expect[fmt]
    loss = {fmt: r.history[-1]["loss"] for fmt, (_, r) in runs.items()}
    assert loss["fp8"] != loss["bf16"]  # fp8 really is lossy
    assert abs(loss["fp8"] - loss["bf16"]) <= FP8_LOSS_RTOL * loss["bf16"], loss


@pytest.mark.slow
def test_killed_features_run_resumes_without_loss_or_duplicates(tmp_path):
    n, shard = 240, 4
    ref = write_features(_config(tmp_path / "ref", "disk", n=n, shard=shard))
    assert ref.shards == n // shard
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "specforge_core.cli", "data", "features", str(QUICKSTART),
            *_overrides(killed, "disk", n=n, shard=shard)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    cache = killed / "cache-bf16"
    deadline = time.time() + 300
    listed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            listed = len(json.loads((cache / "index.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            listed = 0
        if listed >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "features finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_index(cache)
    assert 3 <= len(before["shards"]) < n // shard and not before["complete"]
    again = write_features(_config(killed, "disk", n=n, shard=shard))
    assert again.written_shards == n // shard - len(before["shards"])
    idx, ref_idx = read_index(cache), read_index(ref.cache_dir)
    assert idx == ref_idx
    ids = [s for e in idx["shards"] for s in e["sample_ids"]]
    assert len(ids) == len(set(ids)) == n
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted(p.name for p in Path(ref.cache_dir).iterdir())  # no temp leftovers
    for name in names:
        if name != "index.json":
            assert (cache / name).read_bytes() == (Path(ref.cache_dir) / name).read_bytes(), name
