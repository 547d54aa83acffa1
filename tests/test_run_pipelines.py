"""One run, two pipelines (``specforge_core.run``): the same config through the local pipeline and
the Ray pipeline (real Ray on loopback, two fsdp2 trainer ranks over gloo, the tiny in-process HF
target) gives the same observer records; W&B (offline) and the profiler work on Ray; a Ray run
trains from the disk feature cache without any inference actor.

Reference for the losses: the local run. 2 ranks x 2 samples per step (fsdp2) is the same
token-weighted objective as 1 process x 2 micro-batches of 2 samples (tests/test_ray_pipeline.py
establishes the tolerance).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from rich.console import Console  # noqa: E402

from specforge_core.config import load_config  # noqa: E402
from specforge_core.pipeline import run_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
TARGET = ROOT / "configs" / "assets" / "tiny-target"

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (TARGET / "model.safetensors").is_file(), reason="tiny target has no weights")]

RAY_ONLY = {"data_wait_s", "stage_s", "stage_read_s", "time", "buffered_samples"}  # the Ray data path's own


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    ray.init(num_cpus=4, object_store_memory=150_000_000, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(out: Path, pipeline: str, *extra: str, draft: str = "llama-eagle3"):
    ranks = ["training.strategy=fsdp2", "training.num_gpus=2", "training.micro_batch_size=2",
             "training.gradient_accumulation=1", "training.fsdp2.mixed_precision=false", "transfer.store=shm",
             "inference.num_gpus=1"]
    local = ["training.micro_batch_size=2", "training.gradient_accumulation=2"]
    return load_config([QUICKSTART], overrides=[
        f"run.output_dir={out}", f"run.pipeline={pipeline}", f"model.draft={draft}", "dataset.max_samples=12",
        f"dataset.cache_dir={out.parent / 'tok'}", "training.scheduler=constant", "training.warmup_ratio=0.0",
        "training.save_every=0", "training.log_every=1", "logging.progress=false",
        *(ranks if pipeline == "ray" else local), *extra])


def run(cfg):
    """The run and what its console printed (the console observer's record)."""
    text = io.StringIO()
    res = run_pipeline(cfg, console=Console(file=text, width=200, soft_wrap=True))
    return res, text.getvalue()


def metric_lines(text: str) -> list[str]:
    """The console's step lines without the timing columns (tok/s, data wait)."""
    return [re.sub(r" \| (run )?\d+ tok/s| \| data wait \d+ ms", "", line)
            for line in text.splitlines() if line.startswith("step ")]


def assert_same_records(local, ray_res, local_text, ray_text, rtol=1e-4, atol=1e-5):
    assert ray_res.steps == local.steps == len(local.history) == len(ray_res.history)
    assert [m["step"] for m in ray_res.history] == [m["step"] for m in local.history]
    for a, b in zip(ray_res.history, local.history, strict=True):
        assert set(a) - RAY_ONLY == set(b)  # the same metric names (the algorithm's own included)
    for name in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([m[name] for m in ray_res.history]),
                                   torch.tensor([m[name] for m in local.history]), rtol=rtol, atol=atol)
    # the console observer printed one line per step in both, naming the same metrics
    a, b = metric_lines(ray_text), metric_lines(local_text)
    assert len(a) == len(b) == local.steps
    assert [re.sub(r"[0-9.e+-]+", "#", x) for x in a] == [re.sub(r"[0-9.e+-]+", "#", x) for x in b]


@pytest.mark.parametrize("draft", ["llama-eagle3", "dflash"])
def test_same_config_same_records_on_both_pipelines(tmp_path, draft):
    local, local_text = run(config(tmp_path / "local", "local", draft=draft))
    ray_res, ray_text = run(config(tmp_path / "ray", "ray", draft=draft))
    assert local.steps == 6  # 12 samples, 4 per step, 2 epochs
    assert_same_records(local, ray_res, local_text, ray_text)
    assert ray_res.accounting == local.accounting
    assert local.export_dir.is_dir() and ray_res.export_dir.is_dir()
    # the algorithm names what the console shows: EAGLE-3 its TTT steps' accuracies, DFlash its
    # block slots' (all block_size - 1 of them), each with the acceptance length
    line = metric_lines(local_text)[-1]
    accs = re.search(r"\| acc ([0-9. ]+) \|", line).group(1).split()
    assert len(accs) == (4 if draft == "llama-eagle3" else 7) and "| tau " in line
    head = "acc_0" if draft == "llama-eagle3" else "acc_1"
    assert all(head in m for m in local.history)


def test_wandb_and_profiler_on_ray(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "ray"
    res, _ = run(config(out, "ray", "logging.wandb=true", "logging.wandb_mode=offline",
                        "profiler.enabled=true", "profiler.start_step=1", "profiler.num_steps=1"))
    assert res.steps == 6
    # W&B: one offline run in output_dir whose log carries the step metrics
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    wanted = (b"train/loss", b"train/acc_0", b"train/data_wait_s")
    deadline = time.monotonic() + 60  # wandb's writer may still flush after finish() returns
    while True:
        data = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
        missing = [w for w in wanted if w not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing
    # profiler: each trainer rank traced step 1 (0-based) into output_dir/traces
    for rank in (0, 1):
        trace = out / "traces" / f"trace_rank{rank}_step2.json"
        assert trace.is_file(), sorted(p.name for p in (out / "traces").glob("*"))
        names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
        assert "ProfilerStep#1" in names


def test_ray_trains_from_the_disk_cache_without_inference(tmp_path, monkeypatch):
    from specforge_core.data.features import write_features
    from specforge_core.pipeline import ray_pipeline

    disk = ["transfer.store=disk", f"transfer.disk.dir={tmp_path / 'cache'}", "inference.dtype=fp32"]
    write_features(config(tmp_path / "write", "local", *disk))

    class NoInference:
        def __init__(self, *a, **k):
            raise AssertionError("an inference actor was started")

    monkeypatch.setattr(ray_pipeline, "InferenceManager", NoInference)
    monkeypatch.setattr(ray_pipeline, "EngineActor", NoInference)
    local, local_text = run(config(tmp_path / "local", "local", *disk))
    ray_res, ray_text = run(config(tmp_path / "ray", "ray", *disk))
    assert "features from the cache (no inference)" in ray_text
    assert_same_records(local, ray_res, local_text, ray_text)
    assert ray_res.controller["trained"] == 24 and ray_res.accounting["trained"] == 12  # 2 epochs of 12
