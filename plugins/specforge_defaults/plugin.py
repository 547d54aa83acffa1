"""Entry point of the bundled defaults plugin: registers its components and declares the default
component of every kind (`register_defaults`)."""

from specforge_core import hookimpl
from specforge_defaults.loss import ForwardKLOptions, make_forward_kl
from specforge_defaults.loss_lk import LKOptions, make_lk
from specforge_defaults.schedulers import DecayOptions, make_constant, make_cosine, make_linear
from specforge_defaults.strategy import LocalStrategyOptions, make_local_strategy
from specforge_defaults.transfer_disk import DiskOptions, make_disk
from specforge_defaults.transfer_local import make_local
from specforge_defaults.transfer_shm import ShmOptions, make_shm


@hookimpl
def register_losses(register):
    register(
        "forward-kl", make_forward_kl, config=ForwardKLOptions,
        description="EAGLE-3 soft cross-entropy (forward KL) per TTT step, fused with both lm_heads in chunks",
    )
    register(
        "lk", make_lk, config=LKOptions,
        description="LK losses (arXiv 2602.23881): the acceptance rate itself (-log alpha, or a KL/acceptance hybrid)",
    )


@hookimpl
def register_lr_schedulers(register):
    register("constant", make_constant, description="linear warmup, then the peak LR")
    register("linear", make_linear, config=DecayOptions, description="linear warmup, then linear decay")
    register("cosine", make_cosine, config=DecayOptions, description="linear warmup, then cosine decay")


@hookimpl
def register_transfer_stores(register):
    register("local", make_local, description="in-process dict (one-process local pipeline)")
    register(
        "shm", make_shm, config=ShmOptions,
        description="one file per sample in shared memory (/dev/shm), for processes on one node",
    )
    register(
        "disk", make_disk, config=DiskOptions,
        description="offline feature cache written by `specforge data features`; runs train without a target",
    )


@hookimpl
def register_training_strategies(register):
    register(
        "local", make_local_strategy, config=LocalStrategyOptions,
        description="one process, no process group; atomic checkpoints",
    )


# What an empty selector means (the core schema names no component). The draft algorithm and the
# target backend come from the bundled llama-eagle3 and hf-backend plugins; a config that sets the
# selector explicitly needs no default, so uninstalling one of those only breaks the unset case.
DEFAULTS = {
    "draft_algorithm": "llama-eagle3",
    "target_backend": "hf",
    "loss": "forward-kl",
    "lr_scheduler": "cosine",
    "training_strategy": "local",
    "transfer_store": "local",
}


@hookimpl
def register_defaults(default):
    for kind, name in DEFAULTS.items():
        default(kind, name)
