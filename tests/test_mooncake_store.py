"""Mooncake transfer store against a real mooncake_master and real clients over TCP on 127.0.0.1."""

from __future__ import annotations

import gc
import os
import socket
import time

import attrs
import pytest
import torch

pytest.importorskip("mooncake.store", reason="Mooncake wheel not installed (extra 'mooncake' or 'mooncake-cpu')")
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")

from specforge_mooncake.master import MooncakeUnavailable  # noqa: E402
from specforge_mooncake.options import MooncakeOptions  # noqa: E402
from specforge_mooncake.provider import MooncakeProvider  # noqa: E402
from specforge_mooncake.sizing import compute_sizes  # noqa: E402
from specforge_mooncake.store import MooncakeStore, MooncakeStoreFull  # noqa: E402

pytestmark = pytest.mark.mooncake
SMALL = dict(global_segment_size=64 << 20, local_buffer_size=16 << 20)


def sample(seed: int, tokens: int, hidden: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 50_000, (tokens,), generator=g),
        "loss_mask": (torch.rand(tokens, generator=g) > 0.5).to(torch.uint8),
        "aux_hidden": torch.randn(tokens, 3 * hidden, generator=g).to(torch.bfloat16),
        "final_hidden": torch.randn(tokens, hidden, generator=g),
        "target_argmax": torch.randint(0, 50_000, (tokens,), generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.int32),
    }


def payload(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts.values())


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture(scope="module")
def master():
    provider = MooncakeProvider(MooncakeOptions(**SMALL, put_timeout_s=5))
    handle = provider.start("test-run")
    yield provider, handle
    provider.stop(handle)
    assert provider._masters == {}


@pytest.fixture
def store(master):
    s = master[0].connect(master[1])
    yield s
    s.delete(s.keys())
    s.close()


def test_round_trip_varying_lengths_and_dtypes(store):
    for i, tokens in enumerate([1, 3, 17, 255, 1024]):
        ts = sample(i, tokens)
        assert store.put(f"s{i}", ts) == payload(ts)
        assert_same(store.get(f"s{i}"), ts)
        assert_same(store.get(f"s{i}", device=torch.device("cpu")), ts)
    assert sorted(store.keys()) == [f"s{i}" for i in range(5)]
    # a second client reads what the first wrote (non-contiguous input is fine too)
    other = MooncakeStore(store.h)
    try:
        t = torch.randn(8, 6).t()
        store.put("nc", {"t": t})
        assert torch.equal(other.get("nc")["t"], t)
    finally:
        other.close()


def test_receive_buffers_are_lent_and_recycled(master):
    handle = attrs.evolve(master[1], recv_buffers=1, put_timeout_s=0.5)
    s = master[0].connect(handle)
    try:
        s.put("a", sample(0, 5))
        held = s.get("a")
        with pytest.raises(TimeoutError, match="recv_buffers"):
            s.get("a")  # the only buffer is still lent to `held`
        ref = {k: v.clone() for k, v in held.items()}
        del held
        gc.collect()
        for _ in range(5):  # the buffer came back and keeps being reused
            assert_same(s.get("a"), ref)
        s.delete(["a"])
    finally:
        s.close()


def test_delete_leaves_no_key(store):
    for i in range(4):
        store.put(f"d{i}", sample(i, 9))
    assert store.count() == 4
    store.delete(["d0", "d2"])
    assert sorted(store.keys()) == ["d1", "d3"]
    with pytest.raises(KeyError, match="d0"):
        store.get("d0")
    store.delete(["d1", "d3", "d0"])  # deleting a missing key is not an error
    assert store.count() == 0


def test_two_runs_never_collide_on_a_joined_master(master, store):
    h = master[1]
    joiner = MooncakeProvider(MooncakeOptions(
        master_addr=h.master_addr, metrics_addr=h.metrics_addr, metadata_server=h.metadata_server, **SMALL))
    h2 = joiner.start("other-run")
    assert not h2.launched and h2.prefix != h.prefix
    s2 = joiner.connect(h2)
    try:
        a, b = sample(1, 4), sample(2, 6)
        store.put("same", a)
        s2.put("same", b)
        assert_same(store.get("same"), a)
        assert_same(s2.get("same"), b)
        assert store.keys() == ["same"] and s2.keys() == ["same"]
        store.put("same", b)  # a second put replaces, even with a different size
        assert_same(store.get("same"), b)
        store.put("same", {"x": torch.arange(3)})
        assert_same(store.get("same"), {"x": torch.arange(3)})
        assert store.count() == 1
    finally:
        s2.delete(["same"])
        s2.close()
        joiner.stop(h2)


def test_full_store_raises_without_dropping_samples():
    provider = MooncakeProvider(MooncakeOptions(global_segment_size=32 << 20, put_timeout_s=0.5))
    handle = provider.start("full")
    s = None
    try:
        s = provider.connect(handle)
        blob = {"x": torch.arange(8 << 20, dtype=torch.uint8)}  # 8 MiB each
        stored = []
        with pytest.raises(MooncakeStoreFull, match="global_segment_size"):
            for i in range(10):
                s.put(f"b{i}", blob)
                stored.append(f"b{i}")
        assert 1 <= len(stored) < 4
        for k in stored:  # hard-pinned: nothing was evicted to make room
            assert torch.equal(s.get(k)["x"], blob["x"])
        s.delete(stored)
        s.put("after", blob)  # room again once consumed samples are deleted
        s.delete(["after"])
        assert s.count() == 0
    finally:
        if s is not None:
            s.close()
        provider.stop(handle)


def test_unreachable_master_fails_fast():
    addr = f"127.0.0.1:{dead_port()}"
    t0 = time.monotonic()
    with pytest.raises(MooncakeUnavailable, match=addr):
        MooncakeProvider(MooncakeOptions(master_addr=addr, connect_timeout_s=1)).start("x")
    handle = MooncakeProvider(MooncakeOptions()).sizes  # noqa: F841 (provider builds without a master)
    with pytest.raises(MooncakeUnavailable, match="unreachable"):
        from specforge_mooncake.store import MooncakeHandle

        MooncakeStore(MooncakeHandle("x", "specforge/x/", addr, addr, "P2PHANDSHAKE", connect_timeout_s=1))
    assert time.monotonic() - t0 < 10


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="allowed"):
        MooncakeOptions(protocol="ib")
    with pytest.raises(ValueError, match="master_addr"):
        MooncakeProvider(MooncakeOptions(master_addr="nohost")).start("x")
    with pytest.raises(ValueError, match="run id"):
        MooncakeProvider().start("bad/id")


def test_compute_sizes_arithmetic():
    s = compute_sizes(hidden_size=4096, n_aux=3, max_seq_length=2048, max_pool_bytes=4 << 30, dtype_bytes=2)
    per_token = 4 * 4096 * 2 + 17  # aux + final bf16, ids + argmax int64, mask uint8
    assert s.sample_bytes % (1 << 20) == 0 and per_token * 2048 < s.sample_bytes <= per_token * 2048 + (1 << 20)
    assert s.global_segment_size >= 1.25 * (4 << 30) and s.local_buffer_size == s.sample_bytes
    assert compute_sizes(0, 3, 2048, 1 << 30).sample_bytes == 0
    with pytest.raises(ValueError, match="max_seq_length"):
        compute_sizes(4096, 3, 0, 1 << 30)


def test_node_environment_overrides(master, monkeypatch):
    from specforge_mooncake.store import node_settings

    h = master[1]
    assert node_settings(h) == ("tcp", "", "127.0.0.1")  # MC_TCP_BIND_ADDRESS
    monkeypatch.setenv("SPECFORGE_MOONCAKE_LOCAL_HOSTNAME", "10.1.2.3")
    monkeypatch.setenv("SPECFORGE_MOONCAKE_PROTOCOL", "rdma")
    with pytest.raises(ValueError, match="device_name"):
        node_settings(h)
    monkeypatch.setenv("SPECFORGE_MOONCAKE_DEVICE_NAME", "mlx5_1")
    assert node_settings(h) == ("rdma", "mlx5_1", "10.1.2.3")
    monkeypatch.setenv("SPECFORGE_MOONCAKE_PROTOCOL", "ib")
    with pytest.raises(ValueError, match="SPECFORGE_MOONCAKE_PROTOCOL"):
        node_settings(h)


def test_handle_and_provider_pickle(master):
    import pickle

    provider, handle = master
    assert pickle.loads(pickle.dumps(handle)) == handle
    clone = pickle.loads(pickle.dumps(provider))
    assert clone._masters == {} and provider._masters  # the master stays owned by the head
