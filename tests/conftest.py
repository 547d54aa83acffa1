"""Shared test setup: offline hub, quiet Ray, deterministic torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
# One intra-op thread per process: tests start several processes (gloo ranks, Ray actors, CLI
# subprocesses) on a 2-core machine, and oversubscribed threads slow each of them ~10x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiny_chat_target(tmp_path_factory):
    """A random tiny Llama that speaks the bundled tiny tokenizer (configs/assets/tiny-target)."""
    import shutil
    from pathlib import Path

    from specforge_core.data import load_tokenizer
    from specforge_core.testing import make_tiny_model

    assets = Path(__file__).resolve().parents[1] / "configs" / "assets"
    path = tmp_path_factory.mktemp("target")
    for f in (assets / "tiny-target").iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, path)
    make_tiny_model(path, vocab_size=len(load_tokenizer(str(path))))
    return path
