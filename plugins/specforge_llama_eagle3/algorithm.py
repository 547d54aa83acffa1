"""``llama-eagle3`` as a draft algorithm (``specforge_core.components.DraftAlgorithm``): build the
draft, train it with the TTT objective (``objective.py``), export it in the SGLang/vLLM layout and
size it for ``specforge plan``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from specforge_core.components import DraftPlan, FeatureSpec, ObjectiveContext, TargetHead
from specforge_core.plugin_api import dtype_bytes, layer_shape
from specforge_core.types import TargetInfo
from specforge_llama_eagle3 import objective
from specforge_llama_eagle3.config import DraftConfig, DraftConfigError, default_aux_layer_ids
from specforge_llama_eagle3.model import LlamaEagle3Draft
from specforge_llama_eagle3.options import LlamaEagle3Options


class LlamaEagle3Algorithm:
    features = FeatureSpec(aux_hidden=True, final_hidden=True, target_argmax=True, block_size=1,
                           default_aux_layers=default_aux_layer_ids, packed_rows=True,
                           min_loss_index=2)  # step 0 at position t predicts t+2

    def __init__(self, options: Any, config: Any = None):
        self.options = options or LlamaEagle3Options()
        self.ttt_length = int(self.options.ttt_length)

    # ------------------------------------------------------------------------------ build
    def build(self, target: TargetInfo, vocab: Any, weights: Any = None) -> LlamaEagle3Draft:
        model = build_draft(self.options, target, int(vocab.d2t.numel()))
        if weights is not None:
            model.load_embedding(weights.embedding())  # the target's, frozen
        return model

    # ------------------------------------------------------------------------------ training
    def count_targets(self, batch: Any, head: TargetHead) -> torch.Tensor:
        return objective.count_targets(batch, head.t2d, self.ttt_length)

    def objective(self, draft: torch.nn.Module, batch: Any, ctx: ObjectiveContext
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return objective.micro_step(draft.ttt_forward, draft.lm_head.weight, ctx.loss, batch, ctx.head, None,
                                    self.ttt_length, ctx.denominators, self.options.step_weight_decay)

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        return objective.summarize(totals)

    def display_metrics(self) -> dict[str, list[str]]:
        """Each TTT step's accuracy and the acceptance length they imply (tau)."""
        return {"acc": [f"acc_{k}" for k in range(self.ttt_length)], "tau": ["accept_len"]}

    # ------------------------------------------------------------------------------ export
    # ------------------------------------------------------------------------------ eval
    export_architectures = ("LlamaForCausalLMEagle3",)

    def proposer(self, export_dir: Any, target: Any, device: Any):
        """The EAGLE-3 chain proposer of ``specforge eval`` (``proposer.py``)."""
        from specforge_llama_eagle3.proposer import make_proposer

        return make_proposer(export_dir, target, device)

    def export(self, draft: torch.nn.Module, vocab: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """config.json + bf16 weights under the engines' keys, plus ``d2t`` (int64 offsets) and
        ``t2d`` (bool mask) as SGLang and vLLM read them."""
        config = draft.export_config()
        if int(config.get("draft_vocab_size", -1)) != int(vocab.d2t.numel()):
            raise ValueError(
                f"export: config draft_vocab_size={config.get('draft_vocab_size')} but the vocab "
                f"mapping has {vocab.d2t.numel()} draft ids"
            )
        state = {name: t.detach().cpu().to(torch.bfloat16).contiguous()
                 for name, t in draft.export_state_dict().items()}
        state["d2t"] = vocab.d2t.detach().cpu().to(torch.int64).contiguous()
        state["t2d"] = vocab.t2d.detach().cpu().to(torch.bool).contiguous()
        return config, state

    # ------------------------------------------------------------------------------ plan
    def plan(self, config: Any, target: dict) -> DraftPlan:
        d, src = draft_shape(config, self.options, target)
        n_aux = len(config.model.aux_layers) or 3
        layers = int(getattr(self.options, "num_layers", 1))
        trainable, frozen = draft_params(d, n_aux, layers)
        if self.options.fc_norm:  # EAGLE-3.1: one RMSNorm weight per aux layer
            trainable += n_aux * d["target_hidden_size"]
        c = dtype_bytes(config.training.dtype)
        K = self.ttt_length
        H, Vd, Ht = d["hidden_size"], d["draft_vocab_size"], d["target_hidden_size"]
        # per token: K steps of saved tensors + the batch's aux/final hidden states and the fc output
        per_token = K * activation_bytes_per_token_step(d, c, layers) + c * (n_aux * Ht + Ht + H)
        return DraftPlan(
            shape=d, source=src, trainable_params=trainable, frozen_params=frozen,
            activation_bytes_per_token=per_token,
            activation_bytes_fixed=K * c * Vd * H,  # the fused loss's saved draft-head gradient per step
            frozen_bytes=c * (frozen + Vd * Ht),  # embedding + the target lm_head rows of the draft vocab
            memory_note=f"ttt {K}",
            problems=draft_file_problems(config, self.options, target),
        )


def build_draft(options: Any, target: TargetInfo, draft_vocab_size: int) -> LlamaEagle3Draft:
    """The draft module for ``target`` (config generated from it, or ``options.config``), optionally
    initialised from an export (``options.init_from``); the embedding is left to the caller."""
    options = options or LlamaEagle3Options()
    n_aux = len(target.aux_layer_ids) or 3
    if options.config:
        cfg = DraftConfig.from_file(options.config, target.hidden_size, target.vocab_size,
                                    draft_vocab_size, num_aux=n_aux, num_layers=options.num_layers)
    else:
        cfg = DraftConfig.from_target(target.hf_config, draft_vocab_size, num_aux=n_aux,
                                      source=f"{target.model_path}/config.json")
    cfg.fc_norm = bool(options.fc_norm)
    cfg.norm_output = bool(options.norm_output)
    cfg.num_hidden_layers = int(options.num_layers)
    model = LlamaEagle3Draft(cfg, aux_layer_ids=target.aux_layer_ids,
                             target_num_layers=target.num_hidden_layers,
                             attention=options.attention, compile=options.compile,
                             activation_checkpointing=options.activation_checkpointing)
    if options.init_from:
        init = Path(options.init_from)
        if not (init / "model.safetensors").exists():
            raise DraftConfigError(f"{init}: no model.safetensors (model.llama-eagle3.init_from must be "
                                   "an exported draft directory)")
        model.load_export_weights(init)
    return model


# ------------------------------------------------------------------------------------ sizing
def draft_shape(config: Any, options: Any, t: dict) -> tuple[dict, str]:
    """The draft's layer shape: the ``config`` file if set, else the target's."""
    path = getattr(options, "config", None)
    raw, src = t, "generated from the target"
    if path:
        try:
            raw, src = json.loads(Path(path).read_text()), str(path)
        except (OSError, json.JSONDecodeError):
            pass  # reported by draft_file_problems
    return {
        **layer_shape(raw),
        "vocab_size": int(t["vocab_size"]),
        # the pipeline caps the draft vocabulary at the target's
        "draft_vocab_size": min(int(config.model.draft_vocab_size), int(t["vocab_size"])),
        "target_hidden_size": int(t["hidden_size"]),
    }, src


def draft_params(d: dict, n_aux: int = 3, num_layers: int = 1) -> tuple[int, int]:
    """(trainable, frozen) parameters of a llama-eagle3 draft.

    trainable = fc (n_aux*Ht*H) + q/k/v over 2H inputs + o_proj + SwiGLU MLP + 4 RMSNorms + lm_head
                + per later layer: q/k/v over H + o_proj + SwiGLU MLP + 2 RMSNorms
    frozen    = the target's token embedding (V*H)
    """
    H, inter = d["hidden_size"], d["intermediate_size"]
    nh, nkv, hd = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    fc = n_aux * d["target_hidden_size"] * H
    attn = 2 * H * (nh + 2 * nkv) * hd + nh * hd * H
    mlp = 3 * H * inter
    norms = 4 * H  # hidden_norm, input_layernorm, post_attention_layernorm, final norm
    head = H * d["draft_vocab_size"]
    later = (num_layers - 1) * (H * (nh + 2 * nkv) * hd + nh * hd * H + mlp + 2 * H)
    return fc + attn + mlp + norms + head + later, d["vocab_size"] * H


def activation_bytes_per_token_step(d: dict, compute_bytes: int, num_layers: int = 1) -> int:
    """Bytes one token keeps for backward in one TTT step (measured on an H100, docs/planning.md):

    c*(8H + 4*nh*hd + 4I) + 16H
      8H: attention input [norm(emb), norm(h)] (2H), o_proj output, residual, post-norm, MLP output,
          layer output, final norm (5H) and the fused loss's saved gradient of the normed hidden (H)
      4*nh*hd: q, k and v after repeat_kv to nh heads (SDPA's inputs) and the attention output
      4I: SwiGLU gate, up, silu(gate), product
      16H: the fp32 inputs the four RMSNorms keep (they compute in fp32)
    Each later layer (estimated the same way, not measured): c*(5H + 4*nh*hd + 4I) + 8H (its normed
    input, o_proj output, residual, post-norm, output; two fp32 norm inputs).
    """
    H, inter = d["hidden_size"], d["intermediate_size"]
    nh, hd = d["num_attention_heads"], d["head_dim"]
    later = (num_layers - 1) * (compute_bytes * (5 * H + 4 * nh * hd + 4 * inter) + 8 * H)
    return compute_bytes * (8 * H + 4 * nh * hd + 4 * inter) + 16 * H + later


def draft_file_problems(config: Any, options: Any, t: dict) -> list[tuple[str, str, str]]:
    """``[model.llama-eagle3] config`` checked against the target and the vocab size."""
    path: Optional[str] = getattr(options, "config", None)
    if not path:
        return []
    key = f"model.{config.model.draft}.config"
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return [("error", key, f"{path}: file not found")]
    except json.JSONDecodeError as exc:
        return [("error", key, f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})")]
    H, V = int(t["hidden_size"]), int(t["vocab_size"])
    out = []
    expect = {"hidden_size": H, "vocab_size": V, "target_hidden_size": H,
              "num_hidden_layers": int(getattr(options, "num_layers", 1)),
              "draft_vocab_size": config.model.draft_vocab_size}
    for field, want in expect.items():
        if field in raw and raw[field] != want:
            where = "model.draft_vocab_size" if field == "draft_vocab_size" else "the target"
            out.append(("error", key, f"{path}: {field} = {raw[field]} but {where} needs {want}"))
    return out


def make_llama_eagle3(options: Any, config: Any = None) -> LlamaEagle3Algorithm:
    return LlamaEagle3Algorithm(options, config)
