"""The draft's architecture settings: generated from the target's config.json, or read from a file.

Rope settings are normalised to the *legacy* layout (``rope_theta`` + ``rope_scaling``) because that
is what SGLang/vLLM read from a draft's config.json; transformers >= 5 writes ``rope_parameters``
instead, so both layouts are accepted on input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import attrs

from specforge_core.plugin_api import draft_rope_parameters, text_config

ROPE_TYPES = ("default", "linear", "llama3")


class DraftConfigError(ValueError):
    """A target or draft config that cannot describe a llama-eagle3 draft."""


@attrs.define
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]  # None = plain RoPE; else {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int
    vocab_size: int  # the target's vocabulary (embedding rows)
    draft_vocab_size: int
    target_hidden_size: int  # width of each captured aux hidden state
    num_aux: int = 3  # number of aux layers concatenated into fc
    fc_norm: bool = False  # EAGLE-3.1: one RMSNorm per aux hidden state before fc (vLLM/speculators "fc_norm")
    norm_output: bool = False  # EAGLE-3.1: the next step reads the normed output (vLLM/speculators "norm_output")
    num_hidden_layers: int = 1  # draft decoder layers (vLLM: layer 0 reads [embedding; hidden], later ones hidden)

    # ---------------------------------------------------------------------------------- builders
    @classmethod
    def from_target(cls, hf_config: dict, draft_vocab_size: int, num_aux: int = 3,
                    source: str = "target config.json") -> DraftConfig:
        """Copy the target's layer shape and rope settings (the EAGLE-3 recipe: one target-shaped layer)."""
        cfg = text_config(hf_config)  # multimodal wrappers keep the language model under text_config
        get = _getter(cfg, source)
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        theta, scaling = rope_settings(cfg, source)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(get("max_position_embeddings")),
            vocab_size=int(get("vocab_size")),
            draft_vocab_size=int(draft_vocab_size),
            target_hidden_size=hidden,
            num_aux=num_aux,
        )

    @classmethod
    def from_file(cls, path: str | Path, target_info_hidden: int, target_vocab: int,
                  draft_vocab_size: int, num_aux: int = 3, num_layers: int = 1) -> DraftConfig:
        """A user-written draft config.json (HF llama keys); checked against the target and vocab map."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise DraftConfigError(f"{path}: draft config file not found (model.llama-eagle3.config)") from None
        except json.JSONDecodeError as e:
            raise DraftConfigError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None
        n_layers = raw.get("num_hidden_layers", num_layers)
        if n_layers != num_layers:
            raise DraftConfigError(f"{path}: num_hidden_layers = {n_layers} but model.llama-eagle3.num_layers is "
                                   f"{num_layers} (set them equal, or drop the key)")
        if "vocab_size" in raw and int(raw["vocab_size"]) != target_vocab:
            raise DraftConfigError(
                f"{path}: vocab_size = {raw['vocab_size']} but the target's vocabulary has {target_vocab} "
                "tokens (the draft shares the target's embedding)")
        if "draft_vocab_size" in raw and int(raw["draft_vocab_size"]) != draft_vocab_size:
            raise DraftConfigError(
                f"{path}: draft_vocab_size = {raw['draft_vocab_size']} but the vocab mapping has "
                f"{draft_vocab_size} entries (set model.draft_vocab_size to match, or drop the key)")
        raw = {**raw, "vocab_size": target_vocab}
        cfg = cls.from_target(raw, draft_vocab_size, num_aux=num_aux, source=str(path))
        cfg.target_hidden_size = int(raw.get("target_hidden_size", target_info_hidden))
        cfg.num_hidden_layers = int(num_layers)
        if cfg.hidden_size != target_info_hidden:
            raise DraftConfigError(
                f"{path}: hidden_size = {cfg.hidden_size} but the target's is {target_info_hidden}; the "
                "draft reuses the target's token embedding, so they must match")
        return cfg

    @classmethod
    def from_export(cls, exported: dict, source: str = "config.json") -> DraftConfig:
        """Read back what ``export_dict`` wrote."""
        get = _getter(exported, source)
        cfg = cls.from_target(exported, int(get("draft_vocab_size")), source=source)
        cfg.target_hidden_size = int(exported.get("target_hidden_size", cfg.hidden_size))
        cfg.fc_norm = bool(exported.get("fc_norm", False))
        cfg.norm_output = bool(exported.get("norm_output", False))
        n_layers = exported.get("num_hidden_layers", 1)
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
            raise DraftConfigError(f"{source}: num_hidden_layers = {n_layers!r}; allowed: an integer >= 1")
        cfg.num_hidden_layers = n_layers
        return cfg

    # ---------------------------------------------------------------------------------- export
    def export_dict(self, aux_layer_ids: Optional[Sequence[int]] = None,
                    target_num_layers: Optional[int] = None) -> dict[str, Any]:
        """The serving-engine config.json fields (rope written out explicitly, see eagle3.md).

        ``aux_layer_ids`` (HF hidden_states indices) and ``target_num_layers`` add the aux-layer
        keys when the layers differ from the default (``aux_layer_keys``)."""
        out = {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        # Only when it differs: SafeAILab/EAGLE's loader (cnets.py) copies the target's embedding
        # into the draft only when the key is absent; SGLang and vLLM fall back to hidden_size.
        if self.target_hidden_size != self.hidden_size:
            out["target_hidden_size"] = self.target_hidden_size
        if aux_layer_ids is not None and target_num_layers is not None:
            out.update(aux_layer_keys(aux_layer_ids, target_num_layers))
        if self.fc_norm:
            out["fc_norm"] = True  # EAGLE-3.1: weights fc_norm.{i}.weight, one per aux layer
        if self.norm_output:
            out["norm_output"] = True  # EAGLE-3.1: no weights; vLLM feeds the normed output forward
        return out


# ---------------------------------------------------------------------------------- helpers
def _getter(cfg: dict, source: str):
    def get(key: str):
        if cfg.get(key) is None:
            raise DraftConfigError(f"{source}: missing required field '{key}'")
        return cfg[key]

    return get


def rope_settings(cfg: dict, source: str = "config") -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from either the legacy or the transformers-5 layout."""
    params = draft_rope_parameters(cfg)  # per-layer-type rope (Gemma 3): the global layers' settings
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        if cfg.get("rope_theta") is None:
            raise DraftConfigError(
                f"{source}: missing 'rope_theta' (engines would silently default it to 10000)")
        theta = float(cfg["rope_theta"])
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise DraftConfigError(
                f"{source}: rope type '{rope_type}' is not supported; allowed: {', '.join(ROPE_TYPES)}")
        if rope_type == "default":
            scaling = None
        else:
            scaling = {k: v for k, v in scaling.items() if k != "type"}
            scaling["rope_type"] = rope_type
    return theta, scaling


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3 default aux layers as HF hidden_states indices (= the input of layers 2, L//2, L-3)."""
    return [2, num_layers // 2, num_layers - 3]


def aux_layer_keys(hf_ids: Sequence[int], target_num_layers: int) -> dict[str, Any]:
    """config.json keys naming non-default aux layers, each in the numbering of the engine that
    reads it ({} for the default layers, which every engine picks by itself).

    * ``eagle_aux_hidden_state_layer_ids`` (top level): vLLM V1 reads it (v1 spec_decode eagle3
      utils ``get_eagle3_aux_layers_from_config``, the V1 model runner) and captures the input of
      layer i for id i: **HF index**. The speculators format writes the same key.
    * ``eagle_config.eagle_aux_hidden_state_layer_ids``: SGLang reads it (model_runner) and
      captures the output of layer id (``set_eagle3_layers_to_capture`` adds 1): **HF index - 1**.
      vLLM reads it only when the top-level key is absent, so the two never clash.
    """
    ids = [int(i) for i in hf_ids]
    if ids == default_aux_layer_ids(target_num_layers):
        return {}
    return {
        "eagle_aux_hidden_state_layer_ids": ids,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids], "use_aux_hidden_state": True},
    }


def hf_aux_layer_ids(exported: dict, old_convention: str = "sglang") -> Optional[list[int]]:
    """HF hidden_states indices an export's config.json names (None = the default layers).

    The top-level key (written since the vLLM fix) is in HF numbering. Older exports wrote the ids
    only under ``eagle_config``, in the numbering their ``aux_ids_convention`` chose:
    ``old_convention`` says which ("sglang" = HF index - 1, "vllm" = HF index)."""
    ids = exported.get("eagle_aux_hidden_state_layer_ids")
    if ids:
        return [int(i) for i in ids]
    eagle = exported.get("eagle_config")
    ids = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
    if not ids:
        return None
    if old_convention not in ("sglang", "vllm"):
        raise ValueError(f"aux ids convention '{old_convention}' is not known; allowed: sglang, vllm")
    return [int(i) + (1 if old_convention == "sglang" else 0) for i in ids]
