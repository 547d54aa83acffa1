"""``[transfer.mooncake]``: options of the Mooncake transfer store."""

from __future__ import annotations

import attrs

from specforge_core.config.fields import non_negative, option, positive
from specforge_core.plugin_api import dtype_bytes


@attrs.define
class MooncakeOptions:
    master_addr: str = option(
        "", "host:port of an existing mooncake_master to join; empty = launch one on the head at start"
    )
    metrics_addr: str = option(
        "", "host:port of the master's HTTP admin server (count/cleanup); empty = launched master's, "
        "or <master host>:9003 when joining",
    )
    metadata_server: str = option(
        "", "Transfer-engine metadata: empty = the master's built-in HTTP metadata server, "
        "'P2PHANDSHAKE', or an http://.../metadata URL",
    )
    master_host: str = option(
        "", "Address the launched master advertises (empty = $MC_TCP_BIND_ADDRESS or this host's IP)"
    )
    protocol: str = option(
        "tcp", "Transfer protocol (env SPECFORGE_MOONCAKE_PROTOCOL overrides per node)", choices=("tcp", "rdma")
    )
    device_name: str = option(
        "", "RDMA device(s), e.g. 'mlx5_0' or 'mlx5_0,mlx5_1' (env SPECFORGE_MOONCAKE_DEVICE_NAME overrides)"
    )
    local_hostname: str = option(
        "", "Address other nodes reach this process at (empty = $MC_TCP_BIND_ADDRESS or the interface "
        "that routes to the master; env SPECFORGE_MOONCAKE_LOCAL_HOSTNAME overrides)",
    )
    global_segment_size: int = option(
        0, "Bytes each connected process contributes to the pool (0 = computed, see docs/mooncake.md)",
        validator=non_negative,
    )
    local_buffer_size: int = option(0, "Mooncake client local buffer bytes (0 = computed)", validator=non_negative)
    sample_bytes: int = option(
        0, "Staging-buffer bytes per sample (0 = computed from the model, or grown to the largest sample)",
        validator=non_negative,
    )
    recv_buffers: int = option(
        4, "Registered receive buffers per consumer (tensors returned by get are views of one)",
        validator=positive,
    )
    gpu_direct: bool = option(
        False, "get(device=cuda) reads into registered GPU buffers (needs the CUDA wheel; RDMA: GPUDirect)"
    )
    put_timeout_s: float = option(
        60.0, "How long a put retries while the store is full before it raises", validator=positive
    )
    connect_timeout_s: float = option(
        15.0, "How long to wait for the master to be reachable before failing", validator=positive
    )
    master_log: str = option("", "File for the launched master's log (empty = a temp file)", path=True)

    def plan_notes(self, config, plan: dict):
        """For ``specforge plan`` / ``config validate``: the sizes this config needs (the facts, as
        ``plan["mooncake"]``), and an error for any explicit size below them."""
        from specforge_core.components import PlanNotes
        from specforge_mooncake.sizing import compute_sizes

        if "target" not in plan:
            return PlanNotes()
        t = plan["target"]
        need = compute_sizes(int(t["hidden_size"]), plan["n_aux"], config.dataset.max_seq_length,
                             config.transfer.max_pool_bytes, dtype_bytes(config.inference.dtype))
        line = (f"mooncake: sample_bytes {need.sample_bytes:,}, global_segment_size {need.global_segment_size:,} "
                f"({need.global_segment_size / 1024**3:.2f} GiB), local_buffer_size {need.local_buffer_size:,}")
        problems = []
        for field in ("sample_bytes", "global_segment_size", "local_buffer_size"):
            have, want = getattr(self, field), getattr(need, field)
            if have and have < want:
                problems.append(("error", f"transfer.mooncake.{field}",
                                 f"{have:,} is smaller than the {want:,} that max_seq_length "
                                 f"{config.dataset.max_seq_length} and transfer.max_pool_bytes need (0 = computed)"))
        return PlanNotes(facts=need, lines=[line], problems=problems)
