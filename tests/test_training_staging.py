"""Staging (training/staging.py): store keys -> a collated Batch, read into caller-owned buffers.

Checked against ``collate`` of the features as ``get`` returns them (a different read path), on
the CPU here; the CUDA path (pinned ring, side stream) runs in test_training_staging_cuda below
only where a GPU exists.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from specforge_defaults.transfer_local import LocalStoreProvider
from specforge_defaults.transfer_shm import ShmOptions, ShmStoreProvider

from specforge_core.training.batch import collate
from specforge_core.training.staging import BatchStager, PinnedRing, StagedBatch, pack, read_into
from specforge_core.types import TargetFeatures


def feature_tensors(n: int, hidden: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 1000, (n,), generator=g),
        "loss_mask": torch.randint(0, 2, (n,), generator=g).to(torch.uint8),
        "aux_hidden": torch.randn(n, 3 * hidden, generator=g).to(torch.bfloat16),
        "final_hidden": torch.randn(n, hidden, generator=g).to(torch.bfloat16),
        "target_argmax": torch.randint(0, 1000, (n,), generator=g),
    }


@pytest.fixture(params=["local", "shm"])
def store(request, tmp_path):
    provider = LocalStoreProvider() if request.param == "local" else ShmStoreProvider(ShmOptions(root=str(tmp_path)))
    handle = provider.start("staging")
    s = provider.connect(handle)
    yield s
    s.delete(["k", "a/b", "s0", "s1", "s2"])  # what these tests put
    provider.stop(handle)


def test_read_into_uses_the_callers_buffer(store):
    ts = feature_tensors(13)
    store.put("k", ts)
    given: list[torch.Tensor] = []

    def alloc(n: int) -> torch.Tensor:
        given.append(torch.full((n,), 0xAB, dtype=torch.uint8))
        return given[-1]

    got = read_into(store, "k", alloc)
    assert len(given) == 1
    base = given[0].untyped_storage().data_ptr()
    for name, t in ts.items():
        assert torch.equal(got[name], t), name
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert got[name].untyped_storage().data_ptr() == base, f"{name} is not a view of the caller's buffer"


def test_shm_get_into_reads_the_file_layout(tmp_path):
    provider = ShmStoreProvider(ShmOptions(root=str(tmp_path)))
    store = provider.connect(provider.start("r"))
    ts = feature_tensors(7)
    store.put("a/b", ts)
    sizes = []
    got = store.get_into("a/b", lambda n: sizes.append(n) or torch.empty(n, dtype=torch.uint8))
    # the whole file (header + 64-byte aligned tensors) went into the one buffer
    assert sizes == [(tmp_path / "specforge-r" / "a%2Fb").stat().st_size]
    assert all(torch.equal(got[k], ts[k]) for k in ts)
    with pytest.raises(KeyError, match="no key 'missing'"):
        store.get_into("missing", lambda n: torch.empty(n, dtype=torch.uint8))


def test_pack_aligns_every_tensor():
    ts = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.arange(5, dtype=torch.int64),
          "c": torch.ones(2, 3, dtype=torch.bfloat16)}
    buf = torch.empty(0)

    def alloc(n):
        nonlocal buf
        buf = torch.zeros(n, dtype=torch.uint8)
        return buf

    out = pack(ts, alloc)
    assert buf.numel() == 64 + 64 + 64  # three tensors, each starting on a 64-byte boundary
    for k in ts:
        assert torch.equal(out[k], ts[k])
        assert (out[k].data_ptr() - buf.data_ptr()) % 64 == 0


def test_stager_batch_equals_collate_of_get(store):
    lengths = [5, 11, 8]
    for i, n in enumerate(lengths):
        store.put(f"s{i}", feature_tensors(n, seed=i))
    keys = [f"s{i}" for i in range(len(lengths))]
    staged = BatchStager("cpu", torch.float32).stage(store, keys, ["0", "1", "2"])
    assert isinstance(staged, StagedBatch) and staged.event is None
    reference = collate([TargetFeatures.from_tensors(k, store.get(k)) for k in keys], "cpu", torch.float32)
    for field in attrs.fields(type(reference)):
        a, b = getattr(staged.ready(), field.name), getattr(reference, field.name)
        if b is None:  # doc_ids / position_ids: packed batches only
            assert a is None, field.name
            continue
        assert a.dtype == b.dtype and torch.equal(a, b), field.name
    # padding is zero / False past each sample's length
    assert staged.batch.lengths.tolist() == lengths
    assert not staged.batch.attention_mask[0, 5:].any() and staged.batch.aux_hidden[0, 5:].abs().sum() == 0


def test_pinned_ring_rejects_zero_slots():
    with pytest.raises(ValueError, match="slots must be >= 1"):
        PinnedRing(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: pinned ring and side stream need a GPU")
def test_training_staging_cuda(store):
    for i, n in enumerate([300, 200, 257]):
        store.put(f"s{i}", feature_tensors(n, hidden=64, seed=i))
    keys = ["s0", "s1", "s2"]
    stager = BatchStager("cuda", torch.bfloat16, ring_slots=2)  # fewer slots than samples: reuse waits
    staged = stager.stage(store, keys, ["0", "1", "2"])
    batch = staged.ready()
    reference = collate([TargetFeatures.from_tensors(k, store.get(k)) for k in keys], "cuda", torch.bfloat16)
    for field in attrs.fields(type(reference)):
        assert torch.equal(getattr(batch, field.name), getattr(reference, field.name)), field.name
    assert stager.ring.pinned_bytes > 0


def test_to_device_views_one_buffer_at_the_same_offsets(store):
    """The CUDA path's single-copy transfer (offset math checked on the CPU, where .to is a no-op)."""
    ts = feature_tensors(9)
    store.put("k", ts)
    bufs: list[torch.Tensor] = []
    host = read_into(store, "k", lambda n: bufs.append(torch.empty(n, dtype=torch.uint8)) or bufs[-1])
    stager = BatchStager("cpu", torch.float32)
    out = stager._to_device(host, bufs[0])
    for k in ts:
        assert torch.equal(out[k], ts[k]) and out[k].data_ptr() == host[k].data_ptr(), k
    # tensors outside the given buffer fall back to one copy each
    other = {"x": torch.arange(4)}
    assert torch.equal(stager._to_device(other, bufs[0])["x"], other["x"])
