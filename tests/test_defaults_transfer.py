"""Transfer stores 'local' and 'shm': round trips, cross-process exchange, overwrite, cleanup."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from specforge_defaults.transfer_local import LocalStoreProvider
from specforge_defaults.transfer_shm import ShmOptions, ShmStoreProvider, key_to_filename


def sample(seed: int, tokens: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "aux_hidden": torch.randn(tokens, 24, generator=g).to(torch.bfloat16),
        "final_hidden": torch.randn(tokens, 8, generator=g),
        "input_ids": torch.randint(0, 1000, (tokens,), generator=g),
        "loss_mask": (torch.rand(tokens, generator=g) > 0.5).to(torch.uint8),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.int32),
        "flags": torch.tensor([True, False, True]),
    }


def payload(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def assert_same(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(params=["local", "shm-mmap", "shm-read"])
def provider(request, tmp_path):
    if request.param == "local":
        return LocalStoreProvider()
    return ShmStoreProvider(ShmOptions(root=str(tmp_path), read_mode=request.param.split("-")[1]))


def test_round_trip_and_delete(provider):
    handle = provider.start("run-1")
    store = provider.connect(handle)
    sent = {f"s{i}": sample(i, tokens=3 + 5 * i) for i in range(4)}
    for key, tensors in sent.items():
        assert store.put(key, tensors) == payload(tensors)
    assert store.count() == 4
    for key, tensors in sent.items():
        assert_same(store.get(key), tensors)
    store.delete(["s0", "s1"])
    assert store.count() == 2
    store.delete(["s2", "s3", "s0"])  # deleting a missing key is a no-op
    assert store.count() == 0
    with pytest.raises(KeyError, match="s2"):
        store.get("s2")
    provider.stop(handle)


def test_overwrite_replaces(provider):
    handle = provider.start("run-ow")
    store = provider.connect(handle)
    store.put("k", sample(1))
    store.put("k", {"x": torch.arange(5)})
    assert store.count() == 1
    assert_same(store.get("k"), {"x": torch.arange(5)})
    store.delete(["k"])
    provider.stop(handle)


def test_non_contiguous_input(provider):
    handle = provider.start("run-nc")
    store = provider.connect(handle)
    t = torch.randn(6, 4).to(torch.bfloat16).T  # non-contiguous view
    store.put("k", {"t": t})
    assert_same(store.get("k"), {"t": t.contiguous()})
    store.delete(["k"])
    provider.stop(handle)


@pytest.mark.parametrize("mode", ["mmap", "read"])
def test_shm_got_tensors_are_private_and_outlive_delete(tmp_path, mode):
    p = ShmStoreProvider(ShmOptions(root=str(tmp_path), read_mode=mode))
    handle = p.start("r")
    store = p.connect(handle)
    sent = sample(3)
    store.put("k", sent)
    got = store.get("k")
    got["final_hidden"].add_(1.0)  # writable, and private to this reader
    assert_same(store.get("k"), sent)
    store.delete(["k"])
    assert store.count() == 0
    torch.testing.assert_close(got["final_hidden"], sent["final_hidden"] + 1.0)  # still readable
    assert torch.equal(got["aux_hidden"], sent["aux_hidden"])
    p.stop(handle)


def test_local_connect_returns_same_store():
    p = LocalStoreProvider()
    handle = p.start("r")
    assert p.connect(handle) is p.connect(handle)
    p.stop(handle)
    with pytest.raises(RuntimeError, match="only works inside one process"):
        p.connect(handle)


def test_shm_stop_removes_directory_and_warns(tmp_path):
    p = ShmStoreProvider(ShmOptions(root=str(tmp_path)))
    handle = p.start("run/with spaces")
    assert handle.path == str(tmp_path / "specforge-run_with_spaces")
    store = p.connect(handle)
    store.put("a", sample(0))
    store.put("b", sample(1))
    with pytest.warns(UserWarning, match="2 keys were left"):
        p.stop(handle)
    assert not os.path.exists(handle.path)


def test_shm_start_clears_stale_directory(tmp_path):
    p = ShmStoreProvider(ShmOptions(root=str(tmp_path)))
    handle = p.start("r")
    p.connect(handle).put("old", sample(0))
    with pytest.warns(UserWarning, match="left by an earlier run"):
        handle2 = p.start("r")
    assert p.connect(handle2).count() == 0
    p.stop(handle2)


def test_shm_keys_are_encoded_or_rejected(tmp_path):
    p = ShmStoreProvider(ShmOptions(root=str(tmp_path)))
    handle = p.start("r")
    store = p.connect(handle)
    odd = ["a/b", "..", ".hidden", "x y%z", "ünï"]
    for i, key in enumerate(odd):
        store.put(key, {"i": torch.tensor([i])})
    assert sorted(store.keys()) == sorted(odd)
    assert all(os.path.dirname(os.path.join(handle.path, key_to_filename(k))) == handle.path for k in odd)
    for i, key in enumerate(odd):
        assert int(store.get(key)["i"]) == i
    for bad in ["", "k" * 300]:
        with pytest.raises(ValueError, match="transfer store 'shm': key"):
            store.put(bad, {"i": torch.tensor([0])})
    store.delete(odd)
    assert store.count() == 0 and os.listdir(handle.path) == []  # no temp files left behind
    p.stop(handle)


def test_shm_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\[transfer.shm\] root"):
        ShmStoreProvider(ShmOptions(root=str(tmp_path / "nope"))).start("r")


# ------------------------------------------------------------------------------ two processes
def _producer(handle, n):
    store = ShmStoreProvider().connect(handle)
    for i in range(n):
        store.put(f"sample-{i}", sample(i, tokens=4 + i))
        store.put("latest", {"i": torch.tensor([i])})  # overwritten while the consumer reads it


def _consume(store, n) -> int:
    import time

    got, deadline = 0, time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        try:
            tensors = store.get(f"sample-{got}")
        except KeyError:
            # 'latest' is being overwritten concurrently: a read sees one whole version, never a mix
            if "latest" in store.keys():
                latest = store.get("latest")["i"]
                assert latest.shape == (1,) and 0 <= int(latest) < n
            time.sleep(0.005)
            continue
        assert_same(tensors, sample(got, tokens=4 + got))
        store.delete([f"sample-{got}"])
        got += 1
    return got


def test_shm_producer_and_consumer_processes(tmp_path):
    ctx = mp.get_context("spawn")
    provider = ShmStoreProvider(ShmOptions(root=str(tmp_path)))
    handle = provider.start("xproc")
    n = 20
    producer = ctx.Process(target=_producer, args=(handle, n))  # gets the handle pickled
    producer.start()
    store = provider.connect(handle)  # this process is the consumer
    got = _consume(store, n)
    producer.join(120)
    assert producer.exitcode == 0
    assert got == n
    assert store.keys() == ["latest"] and int(store.get("latest")["i"]) == n - 1
    store.delete(["latest"])
    provider.stop(handle)
    assert not os.path.exists(handle.path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tensors: the pinned staging path needs CUDA")
def test_shm_put_of_gpu_tensors_round_trips(tmp_path):
    provider = ShmStoreProvider(ShmOptions(root=str(tmp_path)))
    handle = provider.start("gpu")
    store = provider.connect(handle)
    for n in (5, 300, 17):  # grows, then reuses the pinned buffer
        ts = {"a": torch.randn(n, 33, device="cuda").to(torch.bfloat16), "b": torch.arange(n, device="cuda"),
              "m": torch.ones(n, dtype=torch.uint8)}  # a host tensor mixed in
        assert store.put(f"k{n}", ts) == sum(t.numel() * t.element_size() for t in ts.values())
        got = store.get(f"k{n}")
        assert all(torch.equal(got[k], ts[k].cpu()) for k in ts)
        store.delete([f"k{n}"])
    provider.stop(handle)
