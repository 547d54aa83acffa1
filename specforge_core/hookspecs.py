"""pluggy hook specifications: one hook per component kind. The whole extension surface is this
file plus the contracts in ``components.py`` (every member a component may implement, required or
optional, is declared there; ``KINDS`` here is the one list of kinds). Plugins import only the
public modules ``plugin_api`` lists (docs/writing-plugins.md).

A plugin module (the target of an entry point in the ``specforge`` group) implements any of these::

    from specforge_core import hookimpl

    @hookimpl
    def register_lr_schedulers(register):
        register("step-decay", make_step_decay, config=StepDecayOptions,
                 description="multiply the LR by gamma every N steps")

``register(name, factory, config=None, description="")``: ``config`` is an attrs class whose
fields become the TOML table ``[<section>.<name>]`` (see ``components.KINDS``).

Who owns which part of the training objective (details in ``components.py``):

- the **draft algorithm** (``register_draft_algorithms``) owns the draft's forward, the alignment of
  draft outputs to target positions, the prediction groups, their weights and the normalisation
  (each group's summed loss divided by its valid-target count over the whole optimizer step, all
  micro-batches and ranks, which the trainer gathers before the step from ``count_targets``);
- the **loss** (``register_losses``) owns only the per-token divergence: ``prepare`` once per
  micro-batch (it may ask for the full-vocab target head), then summed loss over valid rows per
  group; it never normalises or weights;
- the **trainer** (core) is generic: micro-batching, backward, clipping, optimizer, summing the
  algorithm's statistics over micro-batches and ranks.
"""

from __future__ import annotations

import pluggy

PROJECT = "specforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------------
# Component kinds: the ONE table. Each kind has a config selector (``section.field`` picks a
# component by name; its own options live in ``[section.<component-name>]``), the pluggy hook that
# registers it (``HOOKS`` below derives from it) and its contract (a class in ``components.py``).
# --------------------------------------------------------------------------------------------------
class Kind(tuple):
    """One row of ``KINDS``. Unpacks as ``(section, selector)`` (what the config code reads);
    ``.hook`` names the registering hook, ``.contract`` its protocol in ``components.py``."""

    hook: str
    contract: str

    def __new__(cls, section: str, selector: str, hook: str, contract: str) -> Kind:
        self = super().__new__(cls, (section, selector))
        self.hook, self.contract = hook, contract
        return self

    @property
    def section(self) -> str:
        return self[0]

    @property
    def selector(self) -> str:
        return self[1]


KINDS: dict[str, Kind] = {
    "draft_algorithm": Kind("model", "draft", "register_draft_algorithms", "DraftAlgorithm"),
    "target_backend": Kind("inference", "backend", "register_target_backends", "TargetBackend"),
    "transfer_store": Kind("transfer", "store", "register_transfer_stores", "TransferStoreProvider"),
    "loss": Kind("training", "loss", "register_losses", "Loss"),
    "lr_scheduler": Kind("training", "scheduler", "register_lr_schedulers", "LRLambda"),
    "training_strategy": Kind("training", "strategy", "register_training_strategies", "TrainingStrategy"),
}


def selected(config, kind: str) -> str:
    """The component name ``config`` selects for ``kind`` ("" = the kind's declared default; the
    config loader fills it in, ``Registry.selected_name`` resolves it on a raw config)."""
    section, selector = KINDS[kind]
    return getattr(getattr(config, section), selector)


@hookspec
def register_draft_algorithms(register):
    """Register draft algorithms (see ``components.DraftAlgorithm``): factory ``(options, config)``."""


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


@hookspec
def register_eval_engines(register):
    """Register serving engines for ``specforge eval --engine NAME`` / ``[eval] engine``:
    ``register(name, run, description="")`` with ``run(request: evaluation.engines.EvalRequest)
    -> evaluation.report.EvalReport`` (see ``components.py``, "evaluation"). Not a component kind:
    no options table; the in-process engine ``hf`` is the core's own."""


@hookspec
def register_defaults(default):
    """Declare the default component of a kind, used where the config leaves its selector empty
    (the schema's defaults are empty: ``model.draft``, ``training.loss``, ...): call
    ``default(kind, name)`` with ``kind`` a key of ``KINDS`` and ``name`` a component some plugin
    registers. One declaration per kind among all installed plugins: two are an error (naming both)
    when that default is needed, as is none; an explicit selector never needs one."""


# kind -> hook name, in the order `specforge plugins` lists them (derived from KINDS)
HOOKS = {kind: k.hook for kind, k in KINDS.items()}
