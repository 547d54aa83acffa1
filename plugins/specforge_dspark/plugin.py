"""``dspark``: DSpark (DFlash's block backbone + a low-rank Markov head + a confidence head) as a
draft algorithm (``specforge_core.components.DraftAlgorithm``), exported in vLLM's ``dspark``
layout (``Qwen3DSparkModel``), with its proposer for ``specforge eval``. It builds on the DFlash
family's backbone (``specforge_dflash``: model, anchors, context bookkeeping, export base) and the
core's generic trainer, loss plugins, export writer and eval loop."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from specforge_dflash.plugin import DFlashAlgorithm

from specforge_core import hookimpl
from specforge_core.components import DraftPlan, ObjectiveContext, TargetHead
from specforge_core.config.fields import non_negative, option, positive
from specforge_core.plugin_api import input_embedding_scale
from specforge_dspark import objective
from specforge_dspark.export import dspark_config, dspark_tensors
from specforge_dspark.model import DSparkDraft, DSparkHeads


@attrs.define
class DSparkOptions:
    block_size: int = option(8, "Query slots per block: the anchor + block_size-1 masked slots, every slot "
                                "drafting one token (block_size draft tokens per forward; vLLM's default "
                                "num_speculative_tokens)", validator=positive)
    num_layers: int = option(2, "Draft decoder layers (the DFlash backbone)", validator=positive)
    anchor_stride: int = option(2, "Training blocks are anchored every this many positions (1 = every position)",
                                validator=positive)
    loss_decay: float = option(4.0, "Slot k's loss (and confidence loss) weighs exp(-k/loss_decay), slot 0 = "
                                    "the anchor's prediction (0 = all slots weigh 1)", validator=non_negative)
    mask_token_id: int = option(-1, "Target token id whose (frozen) embedding marks the masked slots; -1 = "
                                    "the target's pad_token_id, else its last id")
    markov_rank: int = option(256, "Rank r of the Markov head's previous-token bias markov_w2(markov_w1[prev]) "
                                   "(speculators/DeepSeek: 256)", validator=positive)
    confidence_head: bool = option(True, "Train and export the acceptance-confidence head (vLLM uses it for "
                                         "adaptive verification on GPUs)")
    confidence_head_with_markov: bool = option(True, "The confidence head also reads the Markov embedding of "
                                                     "the previous token")
    confidence_alpha: float = option(1.0, "Weight of the confidence head's BCE against the analytical "
                                          "acceptance sum_v min(p, q)", validator=non_negative)
    train_block_lengths: list[int] = option(
        factory=list, help="Query-block lengths trained (1..block_size, cycled over the blocks); empty = "
                           "block_size only. Serving K draft tokens runs K slots, so list eval.steps when "
                           "K < block_size (docs/dflash.md: block length)")

    def validate_with(self, config: Any) -> None:
        bad = [n for n in self.train_block_lengths if not 1 <= int(n) <= self.block_size]
        if bad:
            raise ValueError(f"model.dspark.train_block_lengths = {self.train_block_lengths}: {bad} outside "
                             f"1..block_size ({self.block_size})")


class DSparkAlgorithm(DFlashAlgorithm):
    export_architectures = ("Qwen3DSparkModel",)

    def __init__(self, options: DSparkOptions | None, config: Any = None):
        super().__init__(options or DSparkOptions(), config)  # DFlash's features, aux layers, draft config
        # the first block (anchor 1) predicts x[2] from its anchor slot
        self.features = attrs.evolve(self.features, min_loss_index=2)

    def _heads(self) -> DSparkHeads:
        o = self.options
        return DSparkHeads(markov_rank=o.markov_rank, confidence_head=o.confidence_head,
                           confidence_head_with_markov=o.confidence_head_with_markov)

    def build(self, target: Any, vocab: Any, weights: Any = None) -> DSparkDraft:
        n_aux = len(target.aux_layer_ids) or 3
        draft = DSparkDraft(self.draft_config(target.hf_config, n_aux, int(vocab.d2t.numel())), self._heads())
        draft.aux_layer_ids = list(target.aux_layer_ids)
        if weights is not None:
            with torch.no_grad():
                # the rows the target's layers read (Gemma: x sqrt(hidden)), as dflash (docs/gemma3.md)
                draft.embed_tokens.weight.copy_(weights.embedding() * input_embedding_scale(target.hf_config))
                draft.lm_head.weight.copy_(weights.head_rows())
        return draft

    def count_targets(self, batch: Any, head: TargetHead) -> torch.Tensor:
        return objective.count_targets(batch, head.t2d, self.options.block_size, self.options.anchor_stride,
                                       self._lengths())

    def objective(self, draft: torch.nn.Module, batch: Any, ctx: ObjectiveContext):
        o = self.options
        return objective.micro_step(draft, batch, ctx, o.anchor_stride, o.loss_decay, o.confidence_alpha,
                                    self._lengths())

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        return objective.summarize(totals)

    def display_metrics(self) -> dict[str, list[str]]:
        """Every slot's accuracy (slot k drafts the (k+1)-th token after the anchor), tau, and the
        confidence head's error against the analytical acceptance."""
        return {"acc": [f"acc_{k}" for k in range(1, self.options.block_size + 1)], "tau": ["accept_len"],
                "conf_err": ["conf_abs_err"]}

    def export(self, draft: DSparkDraft, vocab: Any):
        return dspark_config(draft, getattr(draft, "aux_layer_ids", [])), dspark_tensors(draft, vocab)

    def proposer(self, export_dir: Any, target: Any, device: Any):
        from specforge_dspark.proposer import make_proposer

        return make_proposer(export_dir, target, device)

    def plan(self, config: Any, target: dict) -> DraftPlan:
        p = super().plan(config, target)
        o, V, H = self.options, int(target["vocab_size"]), int(target["hidden_size"])
        vd = int(p.shape["draft_vocab_size"])
        extra = V * o.markov_rank + vd * o.markov_rank
        if o.confidence_head:
            extra += H + (o.markov_rank if o.confidence_head_with_markov else 0) + 1
        p.trainable_params += extra
        p.shape["markov_rank"] = o.markov_rank
        p.problems = [pr for pr in p.problems if pr[1] not in ("eval.steps", "model.dflash.train_block_lengths")]
        if int(config.eval.steps) > o.block_size:
            p.problems.append(("warning", "eval.steps", f"{config.eval.steps} draft tokens per cycle but a dspark "
                               f"block proposes {o.block_size} (model.dspark.block_size)"))
        elif self._lengths() and int(config.eval.steps) > max(self._lengths()):
            p.problems.append(("warning", "model.dspark.train_block_lengths", f"eval.steps = {config.eval.steps} "
                               f"serves {config.eval.steps}-slot blocks, longer than any trained "
                               f"({max(self._lengths())}): acceptance falls at the untrained slots (docs/dflash.md)"))
        return p


def make_dspark(options: DSparkOptions | None, config: Any = None) -> DSparkAlgorithm:
    return DSparkAlgorithm(options, config)


@hookimpl
def register_draft_algorithms(register):
    register("dspark", make_dspark, config=DSparkOptions,
             description="DSpark: DFlash block draft + Markov and confidence heads, one forward drafts "
                         "block_size tokens (vLLM method dspark)")
