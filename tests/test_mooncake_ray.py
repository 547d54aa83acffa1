"""Mooncake store across processes: a producer here, a consumer in a Ray actor (real master, TCP)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("mooncake.store", reason="Mooncake wheel not installed (extra 'mooncake' or 'mooncake-cpu')")
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")

from specforge_mooncake.options import MooncakeOptions  # noqa: E402
from specforge_mooncake.provider import MooncakeProvider  # noqa: E402
from specforge_mooncake.store import MooncakeStore  # noqa: E402

pytestmark = pytest.mark.mooncake
SMALL = dict(global_segment_size=64 << 20, local_buffer_size=16 << 20)


def sample(seed: int, tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 50_000, (tokens,), generator=g),
        "aux_hidden": torch.randn(tokens, 48, generator=g).to(torch.bfloat16),
        "final_hidden": torch.randn(tokens, 16, generator=g),
    }


@pytest.fixture(scope="module")
def master():
    provider = MooncakeProvider(MooncakeOptions(**SMALL, put_timeout_s=5))
    handle = provider.start("ray-master")
    yield provider, handle
    provider.stop(handle)


# ------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # workers inherit MC_TCP_BIND_ADDRESS=127.0.0.1 from this process (set above / in conftest)
    ray.init(num_cpus=2, object_store_memory=200_000_000, include_dashboard=False)
    yield ray
    ray.shutdown()


def _consumer_class(ray):
    @ray.remote(num_cpus=0)
    class Consumer:
        def __init__(self, provider, handle):
            self.store = provider.connect(handle)

        def take(self, keys, delete):
            out = {}
            for k in keys:
                ts = self.store.get(k)
                out[k] = {n: (str(t.dtype), tuple(t.shape), t.double().sum().item()) for n, t in ts.items()}
            if delete:
                self.store.delete(keys)
            return out

    return Consumer


def summary(ts):
    return {n: (str(t.dtype), tuple(t.shape), t.double().sum().item()) for n, t in ts.items()}


@pytest.mark.ray
@pytest.mark.slow
def test_producer_and_ray_consumer_and_killed_consumer_cleanup(ray_cluster, master):
    ray = ray_cluster
    h = master[1]
    # a run that joins the shared master, so its stop() only cleans keys and we can check the master after
    provider = MooncakeProvider(MooncakeOptions(
        master_addr=h.master_addr, metrics_addr=h.metrics_addr, metadata_server=h.metadata_server, **SMALL))
    handle = provider.start("ray-run")
    producer = provider.connect(handle)
    Consumer = _consumer_class(ray)
    try:
        samples = {f"k{i}": sample(10 + i, 3 + 50 * i) for i in range(6)}
        for k, ts in samples.items():
            producer.put(k, ts)
        consumer = Consumer.remote(provider, handle)  # provider and handle pickle to the actor
        got = ray.get(consumer.take.remote(["k0", "k1", "k2"], True))
        assert got == {k: summary(samples[k]) for k in ["k0", "k1", "k2"]}
        assert sorted(producer.keys()) == ["k3", "k4", "k5"]
        # the consumer reads and dies before deleting: stop() must still leave nothing behind
        assert ray.get(consumer.take.remote(["k3"], False)) == {"k3": summary(samples["k3"])}
        ray.kill(consumer)
        assert producer.count() == 3
    finally:
        provider.stop(handle)
    assert MooncakeStore.keys_of(handle) == []
    producer.close()
