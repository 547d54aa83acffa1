"""specforge_core.distributed: backend choice, ports, a real 1-rank gloo group."""

import socket

import pytest
import torch
import torch.distributed as dist

from specforge_core.distributed import destroy, free_port, init_process_group, pick_backend


def test_pick_backend():
    assert pick_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert pick_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="allowed: 'auto', 'gloo', 'nccl'"):
        pick_backend("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            pick_backend("nccl")


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_init_and_destroy_one_rank_group():
    with pytest.raises(ValueError, match="master_port is required"):
        init_process_group("gloo", rank=0, world_size=2)
    try:
        assert init_process_group("auto", rank=0, world_size=1) == pick_backend("auto")
        assert dist.get_world_size() == 1
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
        with pytest.raises(RuntimeError, match="already initialised"):
            init_process_group("gloo", rank=0, world_size=1)
    finally:
        destroy()
    assert not dist.is_initialized()
    destroy()  # no-op when not initialised


def test_fsdp2_registered_with_validated_options():
    from specforge_fsdp2.strategy import FSDP2Options, make_fsdp2

    from specforge_core.registry import get_registry

    comp = get_registry().get("training_strategy", "fsdp2")
    assert comp.factory is make_fsdp2 and comp.config_class is FSDP2Options
    with pytest.raises(ValueError, match="allowed: 'full', 'replicate'"):
        FSDP2Options(sharding="hybrid")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        make_fsdp2(FSDP2Options(), None)
