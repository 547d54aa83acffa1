"""The inference engine's store writes (EngineActor.generate, called in-process: the Ray actor
wrapper adds nothing to what is checked here): parallel puts, exact byte counts, and a failed put
that leaves nothing behind. Real tiny HF target (configs/assets), real shm store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specforge_core.config import load_config
from specforge_core.data import build_samples, load_tokenizer
from specforge_core.pipeline.ray.controller import PromptBatch
from specforge_core.pipeline.ray.dispatch import ResultBatch
from specforge_core.pipeline.ray.inference import EngineActor
from specforge_core.training.components import create

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def engine(tmp_path):
    config = load_config(
        [ROOT / "configs" / "quickstart.toml"],
        overrides=[f'run.output_dir="{tmp_path}/out"', 'run.pipeline="ray"', 'transfer.store="shm"',
                   f'transfer.shm.root="{tmp_path}"', "inference.batch_size=4", "transfer.put_threads=3",
                   f'dataset.cache_dir="{tmp_path}/cache"', f'model.target="{ROOT}/configs/assets/tiny-target"',
                   f'dataset.path=["{ROOT}/configs/assets/data/sample_chat.jsonl"]'],
    )
    samples, _ = build_samples(config.dataset, load_tokenizer(config.model.target))
    provider = create(config, "transfer_store")
    handle = provider.start("engine-test")
    eng = EngineActor(config, samples, handle, "run1")
    yield eng, samples
    eng.close()
    provider.stop(handle)


def prompts(samples, idx):
    return PromptBatch(np.asarray(idx, np.int64) + 100, np.asarray(idx, np.int64),
                       np.asarray([samples[i].num_tokens for i in idx], np.int64)).wire()


def test_generate_writes_every_sample_with_exact_bytes(engine):
    eng, samples = engine
    res = ResultBatch.from_wire(eng.generate(prompts(samples, [0, 1, 2, 3])))
    assert list(res.keys) == [f"run1/s{100 + i}" for i in range(4)]
    for i, key in enumerate(res.keys):
        got = eng.store.get(key)
        assert torch.equal(got["input_ids"], samples[i].input_ids)
        assert int(res.nbytes[i]) == sum(t.numel() * t.element_size() for t in got.values())
        assert int(res.num_tokens[i]) == samples[i].num_tokens
    eng.store.delete(list(res.keys))
    assert eng.store.count() == 0


def test_a_failed_put_fails_the_batch_and_leaves_no_key(engine):
    eng, samples = engine
    real_put = eng.store.put

    def put(key, tensors):
        if key.endswith("s102"):
            raise OSError("disk full (injected)")
        return real_put(key, tensors)

    eng.store.put = put
    with pytest.raises(OSError, match="injected"):
        eng.generate(prompts(samples, [0, 1, 2, 3]))
    assert eng.store.count() == 0  # the three puts that succeeded were removed
