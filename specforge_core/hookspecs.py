"""pluggy hook specifications: one hook per component kind.

A plugin module (the target of an entry point in the ``specforge`` group) implements any of these::

    from specforge_core import hookimpl

    @hookimpl
    def register_lr_schedulers(register):
        register("step-decay", make_step_decay, config=StepDecayOptions,
                 description="multiply the LR by gamma every N steps")

``register(name, factory, config=None, description="")``: ``config`` is an attrs class whose
fields become the TOML table ``[<section>.<name>]`` (see ``components.KINDS``).
"""

from __future__ import annotations

import pluggy

PROJECT = "specforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_draft_models(register):
    """Register draft-model factories (see ``components.DraftModel``)."""


@hookspec
def register_target_backends(register):
    """Register target-backend factories (see ``components.TargetBackend``)."""


@hookspec
def register_transfer_stores(register):
    """Register transfer-store providers (see ``components.TransferStoreProvider``)."""


@hookspec
def register_losses(register):
    """Register loss factories (see ``components.Loss``)."""


@hookspec
def register_lr_schedulers(register):
    """Register LR-schedule factories (see ``components.LRLambda``)."""


@hookspec
def register_training_strategies(register):
    """Register training strategies (see ``components.TrainingStrategy``)."""


# kind -> hook name, in the order `specforge plugins` lists them
HOOKS = {
    "draft_model": "register_draft_models",
    "target_backend": "register_target_backends",
    "transfer_store": "register_transfer_stores",
    "loss": "register_losses",
    "lr_scheduler": "register_lr_schedulers",
    "training_strategy": "register_training_strategies",
}
