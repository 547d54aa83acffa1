"""What a plugin may import from the core besides the contracts: the one stable helper module.

A plugin imports only these public modules (``tests/test_plugin_imports.py`` walks the bundled
plugins and the example plugins and fails on any other ``specforge_core`` import):

==================================  ============================================================
``specforge_core``                  ``hookimpl``
``specforge_core.components``       the contracts, their records (``FeatureSpec``, ``DraftPlan``,
                                    ``TargetHead``, ``LossOutput``, ``PlanNotes``...) and ``capability``
``specforge_core.config.fields``    ``option`` and validators (also re-exported by ``specforge_core.config``)
``specforge_core.types``            ``Sample``, ``TargetFeatures``, ``TargetInfo``
``specforge_core.plugin_api``       this module: helpers below
``specforge_core.api``              composing and running a pipeline from Python (``Pipeline``)
==================================  ============================================================

Everything else in ``specforge_core`` is internal and may change without notice. The names below
are resolved on first use (``from specforge_core.plugin_api import read_extra``), so importing this
module stays cheap and a light process pays only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute; "" = the module itself); grouped by what a plugin of each kind needs.
_EXPORTS: dict[str, tuple[str, str]] = {
    # registering
    "hookimpl": ("specforge_core.hookspecs", "hookimpl"),
    "KINDS": ("specforge_core.hookspecs", "KINDS"),
    # configs: the run's config, loading one, the component a config selects
    "SpecforgeConfig": ("specforge_core.config.schema", "SpecforgeConfig"),
    "load_config": ("specforge_core.config.loader", "load_config"),
    "draft_algorithm": ("specforge_core.build", "algorithm"),
    # batches an algorithm's objective receives
    "Batch": ("specforge_core.training.batch", "Batch"),
    # dtypes by config name ("bf16", "fp32", "auto"...): the one table (``specforge_core.dtypes``)
    "DTYPES": ("specforge_core.dtypes", "TORCH"),
    "resolve_dtype": ("specforge_core.dtypes", "resolve"),
    "engine_dtype": ("specforge_core.dtypes", "engine_name"),
    "dtype_from_engine": ("specforge_core.dtypes", "from_engine_name"),
    "dtype_bytes": ("specforge_core.dtypes", "nbytes"),
    # target helpers (backends): static facts from a checkpoint's config.json
    "target_info": ("specforge_core.target", "target_info"),
    "target_info_for": ("specforge_core.target", "target_info_for"),  # the run's aux layers resolved
    "text_config": ("specforge_core.hfconfig", "text_config"),
    "read_config_json": ("specforge_core.hfconfig", "read_config_json"),
    "draft_rope_parameters": ("specforge_core.hfconfig", "draft_rope_parameters"),
    "input_embedding_scale": ("specforge_core.hfconfig", "input_embedding_scale"),
    "layer_shape": ("specforge_core.hfconfig", "layer_shape"),  # a decoder layer's matrix sizes
    "decoder_dims": ("specforge_core.hfconfig", "decoder_dims"),  # a target-shaped draft layer
    "mask_token_id": ("specforge_core.hfconfig", "mask_token_id"),
    # checkpoint I/O (training strategies): the COMPLETE marker, extra state without pickle, weights
    "COMPLETE": ("specforge_core.training.checkpoint", "COMPLETE"),
    "CheckpointError": ("specforge_core.training.checkpoint", "CheckpointError"),
    "is_complete": ("specforge_core.training.checkpoint", "is_complete"),
    "write_complete": ("specforge_core.training.checkpoint", "write_complete"),
    "problems": ("specforge_core.training.checkpoint", "problems"),
    "read_extra": ("specforge_core.training.checkpoint", "read_extra"),
    "write_extra": ("specforge_core.training.checkpoint", "write_extra"),
    "load_model_weights": ("specforge_core.training.checkpoint", "load_model_weights"),
    "load_optimizer_state": ("specforge_core.training.checkpoint", "load_optimizer_state"),
    "safe_dcp": ("specforge_core.training.safe_dcp", ""),  # distributed checkpoints without unpickling
    # distributed helpers (strategies)
    "local_rank": ("specforge_core.distributed", "local_rank"),
    "init_process_group": ("specforge_core.distributed", "init_process_group"),
    # the feature cache (feature-supplying transfer stores)
    "CacheBackend": ("specforge_core.data.features", "CacheBackend"),
    "bytes_per_token": ("specforge_core.data.features", "bytes_per_token"),
    "feature_names": ("specforge_core.data.features", "feature_names"),
    # evaluation accounting and reports (eval engines)
    "EvalRequest": ("specforge_core.evaluation.engines", "EvalRequest"),
    "AcceptStats": ("specforge_core.evaluation.accounting", "AcceptStats"),
    "stats_from_cycles": ("specforge_core.evaluation.accounting", "stats_from_cycles"),
    "truncate_cycle": ("specforge_core.evaluation.accounting", "truncate_cycle"),
    "first_difference": ("specforge_core.evaluation.evaluate", "first_difference"),
    "EvalReport": ("specforge_core.evaluation.report", "EvalReport"),
    "PromptReport": ("specforge_core.evaluation.report", "PromptReport"),
    # tests and benchmarks: tiny real HF models
    "make_tiny_model": ("specforge_core.testing", "make_tiny_model"),
    "tiny_config": ("specforge_core.testing", "tiny_config"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"specforge_core.plugin_api has no {name!r}; it offers: {', '.join(__all__)}") from None
    value = importlib.import_module(module)
    value = getattr(value, attr) if attr else value
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return __all__
