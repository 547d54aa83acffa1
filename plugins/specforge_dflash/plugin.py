"""``dflash``: the DFlash block-diffusion draft as a draft algorithm
(``specforge_core.components.DraftAlgorithm``), with its export in vLLM's ``dflash`` layout and its
block proposer for ``specforge eval``. Shares no code with llama-eagle3: only the core's generic
trainer, loss plugins, export writer and eval loop."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from specforge_core import hookimpl
from specforge_core.components import DraftPlan, FeatureSpec, ObjectiveContext, TargetHead
from specforge_core.config.fields import non_negative, option, positive
from specforge_core.plugin_api import decoder_dims, input_embedding_scale, mask_token_id
from specforge_dflash import objective
from specforge_dflash.export import ARCHITECTURE, export_config, export_tensors
from specforge_dflash.model import DFlashConfig, DFlashDraft


@attrs.define
class DFlashOptions:
    block_size: int = option(8, "Tokens per block: the anchor (last committed token) + block_size-1 masked "
                                "slots, i.e. block_size-1 draft tokens per forward (z-lab: 16)",
                             validator=positive)
    num_layers: int = option(2, "Draft decoder layers (with one, the masked slots read only the anchor's raw "
                                "embedding; z-lab's 8B drafts: 5)", validator=positive)
    anchor_stride: int = option(2, "Training blocks are anchored every this many positions (1 = every "
                                   "position; cost grows as sequence_length^2 * block_size / stride)",
                                validator=positive)
    loss_decay: float = option(4.0, "Slot j's loss weighs exp(-(j-1)/loss_decay) (DFlash's position decay; "
                                    "0 = all slots weigh 1)", validator=non_negative)
    mask_token_id: int = option(-1, "Target token id whose (frozen) embedding marks the masked slots; -1 = "
                                    "the target's pad_token_id, else its last id")
    train_block_lengths: list[int] = option(
        factory=list, help="Query-block lengths trained (2..block_size, cycled over the blocks); empty = "
                           "block_size only. Serving with K draft tokens runs 1+K slots (vLLM dflash), so "
                           "list eval.steps+1 when K < block_size-1 (docs/dflash.md: block length)")

    def validate_with(self, config: Any) -> None:
        if self.block_size < 2:
            raise ValueError(f"model.dflash.block_size = {self.block_size}: a block needs the anchor and at "
                             "least one masked slot (>= 2)")
        bad = [n for n in self.train_block_lengths if not 2 <= int(n) <= self.block_size]
        if bad:
            raise ValueError(f"model.dflash.train_block_lengths = {self.train_block_lengths}: {bad} outside "
                             f"2..block_size ({self.block_size}); a block is the anchor and 1..block_size-1 slots")


class DFlashAlgorithm:
    export_architectures = (ARCHITECTURE,)

    def __init__(self, options: DFlashOptions | None, config: Any = None):
        self.options = options or DFlashOptions()
        self.features = FeatureSpec(aux_hidden=True, final_hidden=True, target_argmax=True,
                                    block_size=self.options.block_size, default_aux_layers=self.default_aux_layers)

    def default_aux_layers(self, num_target_layers: int) -> list[int]:
        """DFlash's own layer choice when ``model.aux_layers`` is unset: one target layer per draft
        layer, spread evenly over layer outputs 1..L-3 (the middle one for a one-layer draft), as
        z-lab's ``build_target_layer_ids``; as HF hidden_states indices (layer output i = index i+1)."""
        n, L = self.options.num_layers, num_target_layers
        if n == 1:
            return [L // 2 + 1]
        return [round(1 + i * (L - 4) / (n - 1)) + 1 for i in range(n)]

    # ------------------------------------------------------------------------------ build
    def draft_config(self, hf: dict, n_aux: int, draft_vocab_size: int) -> DFlashConfig:
        dims = decoder_dims(hf)  # one target-shaped layer per draft layer
        return DFlashConfig(
            **dims, num_hidden_layers=self.options.num_layers, draft_vocab_size=draft_vocab_size,
            target_hidden_size=dims["hidden_size"], num_aux=n_aux, block_size=self.options.block_size,
            mask_token_id=mask_token_id(hf, self.options.mask_token_id))

    def build(self, target: Any, vocab: Any, weights: Any = None) -> DFlashDraft:
        n_aux = len(target.aux_layer_ids) or 3
        draft = DFlashDraft(self.draft_config(target.hf_config, n_aux, int(vocab.d2t.numel())))
        draft.aux_layer_ids = list(target.aux_layer_ids)
        if weights is not None:
            with torch.no_grad():
                # what the target's layers read (Gemma: rows x sqrt(hidden)); the export ships this
                # table, so an engine keeps it instead of sharing the target's (docs/gemma3.md)
                draft.embed_tokens.weight.copy_(weights.embedding() * input_embedding_scale(target.hf_config))
                draft.lm_head.weight.copy_(weights.head_rows())  # start from the target's head
        return draft

    # ------------------------------------------------------------------------------ training
    def count_targets(self, batch: Any, head: TargetHead) -> torch.Tensor:
        return objective.count_targets(batch, head.t2d, self.options.block_size, self.options.anchor_stride,
                                       self._lengths())

    def objective(self, draft: torch.nn.Module, batch: Any, ctx: ObjectiveContext):
        return objective.micro_step(draft, batch, ctx, self.options.anchor_stride, self.options.loss_decay,
                                    self._lengths())

    def _lengths(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.options.train_block_lengths)

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        return objective.summarize(totals)

    def display_metrics(self) -> dict[str, list[str]]:
        """Every block slot's accuracy (slot j: the j-th token after the anchor) and tau."""
        return {"acc": [f"acc_{j}" for j in range(1, self.options.block_size)], "tau": ["accept_len"]}

    # ------------------------------------------------------------------------------ export / eval
    def export(self, draft: DFlashDraft, vocab: Any):
        return export_config(draft.config, getattr(draft, "aux_layer_ids", [])), export_tensors(draft, vocab)

    def proposer(self, export_dir: Any, target: Any, device: Any):
        from specforge_dflash.proposer import make_proposer

        return make_proposer(export_dir, target, device)

    # ------------------------------------------------------------------------------ plan
    def plan(self, config: Any, target: dict) -> DraftPlan:
        n_aux = len(config.model.aux_layers or self.default_aux_layers(int(target["num_hidden_layers"])))
        vd = min(int(config.model.draft_vocab_size), int(target["vocab_size"]))
        c = self.draft_config(target, n_aux, vd)
        H, inter, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        layer = H * (2 * qd + 2 * kvd) + 3 * H * inter + 2 * H + 2 * c.head_dim
        trainable = n_aux * H * H + H + L * layer + H + vd * H
        cb = 4 if config.training.dtype == "fp32" else 2
        B, s = c.block_size, self.options.anchor_stride
        # per token of the micro-batch: its features, its context state and K/V per layer, and the
        # B/s block slots anchored per position with each layer's saved activations
        slot = L * (6 * H + 2 * qd + 2 * kvd + 3 * inter) + 2 * H
        per_token = cb * (n_aux * H + H + H + L * 2 * kvd) + (B * cb * slot) // s
        # plain attention keeps fp32 scores and probabilities of every slot over the whole context
        # (up to max_seq_length keys): the term that dominates long sequences
        per_token += (B * L * c.num_attention_heads * int(config.dataset.max_seq_length) * 4 * 2) // s
        problems = []
        if int(config.eval.steps) > c.block_size - 1:
            problems.append(("warning", "eval.steps", f"{config.eval.steps} draft tokens per cycle but a dflash "
                             f"block proposes {c.block_size - 1} (model.dflash.block_size - 1)"))
        elif self._lengths() and int(config.eval.steps) + 1 > max(self._lengths()):
            problems.append(("warning", "model.dflash.train_block_lengths", f"eval.steps = {config.eval.steps} "
                             f"serves {int(config.eval.steps) + 1}-slot blocks, longer than any trained "
                             f"({max(self._lengths())}): acceptance falls at the untrained slots (docs/dflash.md)"))
        return DraftPlan(
            shape={"hidden_size": H, "num_layers": L, "block_size": B, "draft_vocab_size": vd,
                   "mask_token_id": c.mask_token_id}, source="generated from the target",
            trainable_params=trainable, frozen_params=c.vocab_size * H,
            activation_bytes_per_token=per_token, frozen_bytes=cb * (c.vocab_size * H + vd * H), problems=problems)


def make_dflash(options: DFlashOptions | None, config: Any = None) -> DFlashAlgorithm:
    return DFlashAlgorithm(options, config)


@hookimpl
def register_draft_algorithms(register):
    register("dflash", make_dflash, config=DFlashOptions,
             description="DFlash: block-diffusion draft, one forward drafts block_size-1 tokens (vLLM method dflash)")
