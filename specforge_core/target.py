"""Backend-independent facts about the target model: its config, aux layers, embedding and head.

Every target backend and the trainer use these. Nothing here instantiates the target model or
imports a heavy backend: the trainer only needs the target's config, its (frozen) token embedding
and the draft-vocab rows of its lm_head, which are read straight from the safetensors files.

Layer-index convention (see docs/target-backends.md): an aux layer id ``i`` names HF
``hidden_states[i]``, the residual stream *entering* decoder layer ``i`` (= the output of layer
``i - 1``). Valid ids are 1..L-1: 0 would be the raw embedding and L is after the final norm.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from specforge_core.build import algorithm
from specforge_core.hfconfig import text_config
from specforge_core.types import TargetInfo

# ------------------------------------------------------------------------------------ aux layers


def aux_layers(config: Any, num_layers: int, registry: Any = None) -> list[int]:
    """``model.aux_layers``, else the draft algorithm's default for an ``num_layers``-layer target
    (``FeatureSpec.default_aux_layers``); the core has no default of its own."""
    if config.model.aux_layers:
        return list(config.model.aux_layers)
    default = algorithm(config, registry).features.default_aux_layers
    if default is None:
        raise ValueError(f"model.aux_layers is unset and draft '{config.model.draft}' declares no default "
                         "(FeatureSpec.default_aux_layers); set model.aux_layers")
    return [int(i) for i in default(num_layers)]


def with_aux_layers(config: Any, registry: Any = None, num_layers: Optional[int] = None) -> Any:
    """``config`` with ``model.aux_layers`` filled in when unset: unset means the draft algorithm's
    default for this target (``aux_layers``). The pipelines, export and plan run on the result, so
    the backends, the trainer, the export and the algorithm's sizing all see one list."""
    if config.model.aux_layers:
        return config
    if num_layers is None:
        hf = load_target_config(config.model.target, config.model.trust_remote_code)
        num_layers = int(hf["num_hidden_layers"])
    layers = aux_layers(config, num_layers, registry)
    try:
        resolve_aux_layers(layers, num_layers)
    except ValueError as exc:
        raise ValueError(f"model.aux_layers is unset and the default of draft '{config.model.draft}' for this "
                         f"{num_layers}-layer target is invalid ({exc}); set model.aux_layers explicitly") from None
    return attrs.evolve(config, model=attrs.evolve(config.model, aux_layers=layers))


def resolve_aux_layers(configured: Sequence[int], num_hidden_layers: int) -> list[int]:
    """Validate aux layer ids (HF hidden_states indices, low -> high) against an L-layer target.
    Empty is an error: the draft algorithm's default is filled in first (``with_aux_layers``)."""
    L = num_hidden_layers
    layers = [int(i) for i in configured]
    if not layers:
        raise ValueError(f"no aux layers given for this {L}-layer target: set model.aux_layers, or let the "
                         "draft algorithm's default fill it in (target.with_aux_layers)")
    where = f"model.aux_layers = {layers}"
    bad = [i for i in layers if not 1 <= i <= L - 1]
    if bad:
        raise ValueError(
            f"{where}: layer ids {bad} are out of range; allowed: 1..{L - 1} "
            f"(HF hidden_states indices of an {L}-layer target; 0 is the embedding, {L} is after "
            f"the final norm)"
        )
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"{where}: layer ids must be distinct and increasing (low -> high), e.g. [1, 3, 5]")
    return layers


# ---------------------------------------------------------------------------------------- config


def _is_local(model_path: str) -> bool:
    return os.path.isdir(model_path)


def load_target_config(model_path: str, trust_remote_code: bool = False) -> dict:
    """The target's config as a dict (``text_config`` keys lifted to the top level).

    A local directory is read from its ``config.json`` as written; a hub id goes through
    ``transformers.AutoConfig`` (which honours ``HF_HUB_OFFLINE`` and the local cache).
    """
    if not model_path:
        raise ValueError("model.target is empty; set it to a local model directory or a hub id")
    if _is_local(model_path):
        path = Path(model_path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model.target = {model_path!r}: no config.json in that directory")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    else:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).to_dict()
        except OSError as e:
            raise FileNotFoundError(
                f"model.target = {model_path!r} is not a local directory and could not be loaded as a "
                f"hub id (offline mode needs it in the HF cache): {e}"
            ) from e
    return text_config(cfg)


def _required(cfg: dict, key: str, model_path: str) -> int:
    if key not in cfg:
        raise KeyError(f"{model_path}: config.json has no {key!r}; is this a causal language model?")
    return int(cfg[key])


def target_info_for(config: Any, registry: Any = None) -> TargetInfo:
    """``target_info`` of ``config``'s target with the run's aux layers (``model.aux_layers``, else
    the draft algorithm's default): what a target backend captures."""
    m = with_aux_layers(config, registry).model
    return target_info(m.target, m.aux_layers, m.trust_remote_code)


def target_info(model_path: str, aux_layers: Sequence[int], trust_remote_code: bool = False) -> TargetInfo:
    """Static facts about the target (no weights); ``aux_layers``: the run's (``with_aux_layers``)."""
    cfg = load_target_config(model_path, trust_remote_code)
    L = _required(cfg, "num_hidden_layers", model_path)
    return TargetInfo(
        model_path=model_path,
        hf_config=cfg,
        aux_layer_ids=resolve_aux_layers(aux_layers, L),
        hidden_size=_required(cfg, "hidden_size", model_path),
        vocab_size=_required(cfg, "vocab_size", model_path),
        num_hidden_layers=L,
    )


# ------------------------------------------------------------------------------ embedding + head

# Checkpoint key names, most common first; a multimodal checkpoint prefixes the language model.
EMBED_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "model.language_model.model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "embed_tokens.weight",
)
HEAD_KEYS = (
    "lm_head.weight",
    "language_model.lm_head.weight",
    "model.language_model.lm_head.weight",
    "embed_out.weight",
)
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_ROW_BLOCK = 8192  # rows read at a time when selecting head rows (bounds peak memory)


def _fetch(model_path: str, filename: str) -> Optional[str]:
    """Local path of ``filename`` in a model dir or hub repo (cached/offline aware), or None."""
    if _is_local(model_path):
        p = os.path.join(model_path, filename)
        return p if os.path.isfile(p) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(model_path, filename)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _weight_map(model_path: str) -> dict[str, str]:
    """Tensor name -> shard file name."""
    index = _fetch(model_path, _INDEX)
    if index is not None:
        return json.loads(Path(index).read_text())["weight_map"]
    single = _fetch(model_path, _SINGLE)
    if single is None:
        raise FileNotFoundError(
            f"model.target = {model_path!r}: neither {_SINGLE} nor {_INDEX} found "
            "(only safetensors checkpoints are supported)"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: _SINGLE for k in f.keys()}


def _find_key(weight_map: dict[str, str], candidates: Sequence[str], suffix: str) -> Optional[str]:
    for k in candidates:
        if k in weight_map:
            return k
    # Unusual prefixes: accept a unique key that ends with the usual name.
    hits = [k for k in weight_map if k.endswith(suffix)]
    return hits[0] if len(hits) == 1 else None


def _read(model_path: str, shard: str, key: str, row_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    from safetensors import safe_open

    path = _fetch(model_path, shard)
    if path is None:
        raise FileNotFoundError(f"{model_path}: shard {shard} listed in {_INDEX} is missing")
    with safe_open(path, framework="pt") as f:
        if row_ids is None:
            return f.get_tensor(key)
        # Read the matrix in row blocks and keep only the requested rows, so selecting 32k rows
        # of a 150k-row head never holds the whole head.
        sl = f.get_slice(key)
        n_rows = sl.get_shape()[0]
        ids = row_ids.to(torch.int64).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_rows):
            raise IndexError(f"row_ids must lie in [0, {n_rows}); got [{int(ids.min())}, {int(ids.max())}]")
        out: Optional[torch.Tensor] = None
        for start in range(0, n_rows, _ROW_BLOCK):
            sel = ((ids >= start) & (ids < start + _ROW_BLOCK)).nonzero().flatten()
            if sel.numel() == 0:
                continue
            block = sl[start : start + _ROW_BLOCK]
            if out is None:
                out = block.new_empty((ids.numel(), *block.shape[1:]))
            out[sel] = block[ids[sel] - start]
        if out is None:  # no rows requested
            out = sl[0:0]
        return out


def load_target_head_and_embedding(
    model_path: str,
    row_ids: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    trust_remote_code: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embed [V, H], head [V or len(row_ids), H])`` read from the target's safetensors.

    ``row_ids`` selects lm_head rows (e.g. the draft vocab's target ids, in draft order). A tied
    target (``tie_word_embeddings`` or no lm_head tensor) uses the embedding as its head.
    """
    cfg = load_target_config(model_path, trust_remote_code)
    wmap = _weight_map(model_path)
    embed_key = _find_key(wmap, EMBED_KEYS, "embed_tokens.weight")
    if embed_key is None:
        raise KeyError(f"{model_path}: no token-embedding tensor found (looked for {', '.join(EMBED_KEYS)})")
    head_key = _find_key(wmap, HEAD_KEYS, "lm_head.weight")
    if cfg.get("tie_word_embeddings", False) or head_key is None:
        head_key = embed_key

    embed = _read(model_path, wmap[embed_key], embed_key)
    if head_key == embed_key:
        head = embed if row_ids is None else embed[row_ids.to(torch.int64).cpu()]
    else:
        head = _read(model_path, wmap[head_key], head_key, row_ids)
    if dtype is not None:
        embed, head = embed.to(dtype), head.to(dtype)
    return embed, head.clone() if head is embed else head
