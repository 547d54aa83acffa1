"""Reading a model's ``config.json`` (torch-free: planning and validation use it).

The one place that flattens multimodal configs and reports a bad file in one line.
"""

from __future__ import annotations

import json
from pathlib import Path


def text_config(cfg: dict) -> dict:
    """Multimodal configs nest the language model under ``text_config``: lift its keys to the top
    (they win over top-level keys) so callers read ``hidden_size`` etc. uniformly."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return cfg
    return {**{k: v for k, v in cfg.items() if k != "text_config"}, **text}


def draft_rope_parameters(cfg: dict) -> dict | None:
    """The target's ``rope_parameters`` a draft layer should use. A per-layer-type table (Gemma 3:
    sliding layers theta 1e4, global layers 1e6) gives its global entry: a draft layer attends over the
    whole context like a global layer. None when the config has no ``rope_parameters``."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and isinstance(params.get("full_attention"), dict):
        return params["full_attention"]
    return params


def layer_shape(cfg: dict) -> dict:
    """A decoder layer's matrix sizes from a config: hidden and MLP sizes, heads
    (``num_key_value_heads`` defaults to the query heads, ``head_dim`` to hidden / heads: Gemma sets
    both apart). Keyword names match the draft configs that take them."""
    cfg = text_config(cfg)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return {
        "hidden_size": hidden,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or hidden // heads),
    }


def decoder_dims(cfg: dict) -> dict:
    """What a target-shaped draft decoder copies from the target's config: its ``layer_shape``,
    RMSNorm eps, the rope theta a global layer uses (``draft_rope_parameters``), context length and
    vocabulary. Keyword names match the draft configs that take them."""
    cfg = text_config(cfg)
    rope = cfg.get("rope_theta") or (draft_rope_parameters(cfg) or {}).get("rope_theta") or 10000.0
    return {
        **layer_shape(cfg),
        "vocab_size": int(cfg["vocab_size"]),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
    }


def mask_token_id(cfg: dict, configured: int = -1) -> int:
    """The id a block or parallel draft writes into the positions it predicts: ``configured`` when
    set (>= 0), else the target's ``pad_token_id``, else its last vocabulary id."""
    if configured >= 0:
        return configured
    cfg = text_config(cfg)
    pad = cfg.get("pad_token_id")
    return int(pad) if isinstance(pad, int) else int(cfg["vocab_size"]) - 1


def input_embedding_scale(cfg: dict) -> float:
    """The factor a target's decoder layers apply to its embedding rows: layer 0 reads
    ``embed_tokens.weight[ids] * scale``. Gemma (every generation) scales by sqrt(hidden_size) inside
    its embedding module; Granite/Falcon-H1 multiply by ``embedding_multiplier``, MiniCPM by
    ``scale_emb``; 1.0 for everything else (Llama, Qwen...). Tests check it against transformers'
    own forward (the input of layer 0 over the table's rows)."""
    cfg = text_config(cfg)
    if "gemma" in str(cfg.get("model_type", "")):
        return float(cfg["hidden_size"]) ** 0.5
    for key in ("embedding_multiplier", "scale_emb"):
        if isinstance(cfg.get(key), (int, float)) and not isinstance(cfg.get(key), bool):
            return float(cfg[key])
    return 1.0


def final_logit_softcap(cfg: dict) -> float | None:
    """The target's ``final_logit_softcapping`` (Gemma 2: logits = cap * tanh(logits / cap) after the
    head), None when it has none (Gemma 3 sets null)."""
    cap = text_config(cfg).get("final_logit_softcapping")
    return float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 else None


def read_config_json(path: str | Path) -> dict:
    """``path`` (a config.json, or a directory holding one) as a flattened dict. Errors are one
    line naming the file: FileNotFoundError, or ValueError for bad JSON / not an object."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return text_config(cfg)
