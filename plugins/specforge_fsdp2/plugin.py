"""Entry point of the bundled fsdp2 plugin: registers its components."""

from specforge_core import hookimpl


@hookimpl
def register_training_strategies(register):
    # Imported when components are collected, not when the entry point is loaded.
    from specforge_fsdp2.strategy import FSDP2Options, make_fsdp2

    register(
        "fsdp2",
        make_fsdp2,
        config=FSDP2Options,
        description="PyTorch FSDP2 (fully_shard): full sharding or replication over trainer ranks, "
        "bf16 mixed precision, atomic distributed checkpoints",
    )
