"""``peagle``: P-EAGLE (parallel-drafting EAGLE) as a draft algorithm
(``specforge_core.components.DraftAlgorithm``): an EAGLE-3 layer stack that drafts all K tokens
in one forward from mask tokens and a learned mask feature, trained with COD-sampled chains; its
export is what vLLM serves as ``eagle3`` with ``parallel_drafting``, and its proposer drafts for
``specforge eval``. Shares no code with llama-eagle3: only the core's generic trainer, loss
plugins, export writer and eval loop."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from specforge_core import hookimpl
from specforge_core.components import DraftPlan, FeatureSpec, ObjectiveContext, TargetHead
from specforge_core.config.fields import in_range, option, positive
from specforge_core.plugin_api import decoder_dims, mask_token_id
from specforge_peagle import objective
from specforge_peagle.export import ARCHITECTURE, export_config, export_tensors
from specforge_peagle.model import PEagleConfig, PEagleDraft


@attrs.define
class PEagleOptions:
    num_depths: int = option(8, "Draft tokens trained per anchor, K: the anchor's prediction + K-1 masked slots "
                                "(serve with num_speculative_tokens <= K; speculators / SpecForge: 8)",
                             validator=positive)
    num_layers: int = option(4, "Draft decoder layers: layer 0 is EAGLE-3's (embedding + feature), the rest "
                                "Llama layers (speculators / SpecForge P-EAGLE: 4)", validator=positive)
    down_sample_ratio: float = option(0.7, "COD sampling: an anchor's chain reaches depth d with probability "
                                           "max(ratio^d, down_sample_ratio_min) (speculators: 0.7)",
                                      validator=in_range(0.0, 1.0, lo_open=True))
    down_sample_ratio_min: float = option(0.2, "COD sampling: floor of the keep probability of deep slots",
                                          validator=in_range(0.0, 1.0))
    train_embedding: bool = option(True, "Train the token embedding (starts as the target's; the peers train it, "
                                         "the mask token's row is what the masked slots read)")
    mask_token_id: int = option(-1, "Target token id of the masked slots; -1 = the target's pad_token_id, "
                                    "else its last id")

    def validate_with(self, config: Any) -> None:
        if self.num_depths < 2:
            raise ValueError(f"model.peagle.num_depths = {self.num_depths}: parallel drafting needs at least one "
                             "masked slot (>= 2)")


class PEagleAlgorithm:
    export_architectures = (ARCHITECTURE,)

    def __init__(self, options: PEagleOptions | None, config: Any = None):
        self.options = options or PEagleOptions()
        self.seed = int(getattr(getattr(config, "run", None), "seed", 0) or 0)
        self.features = FeatureSpec(aux_hidden=True, final_hidden=True, target_argmax=True,
                                    block_size=self.options.num_depths, default_aux_layers=self.default_aux_layers,
                                    min_loss_index=2)  # the entry at p predicts x[p+2]

    @staticmethod
    def default_aux_layers(num_target_layers: int) -> list[int]:
        """EAGLE-3's layers (the peers' P-EAGLE keeps them): the residual entering layers 2, L//2
        and L-3, as HF hidden_states indices."""
        L = num_target_layers
        return [2, L // 2, L - 3]

    # ------------------------------------------------------------------------------ build
    def draft_config(self, hf: dict, n_aux: int, draft_vocab_size: int) -> PEagleConfig:
        dims = decoder_dims(hf)  # one target-shaped layer per draft layer
        return PEagleConfig(
            **dims, num_hidden_layers=self.options.num_layers, draft_vocab_size=draft_vocab_size,
            target_hidden_size=dims["hidden_size"], num_aux=n_aux, num_depths=self.options.num_depths,
            mask_token_id=mask_token_id(hf, self.options.mask_token_id))

    def build(self, target: Any, vocab: Any, weights: Any = None) -> PEagleDraft:
        n_aux = len(target.aux_layer_ids) or 3
        draft = PEagleDraft(self.draft_config(target.hf_config, n_aux, int(vocab.d2t.numel())))
        draft.aux_layer_ids = list(target.aux_layer_ids)
        if weights is not None:
            with torch.no_grad():
                draft.embed_tokens.weight.copy_(weights.embedding())
                draft.lm_head.weight.copy_(weights.head_rows())  # start from the target's head
        draft.embed_tokens.weight.requires_grad_(self.options.train_embedding)
        return draft

    # ------------------------------------------------------------------------------ training
    def _cod(self) -> tuple[float, float, int]:
        return self.options.down_sample_ratio, self.options.down_sample_ratio_min, self.seed

    def count_targets(self, batch: Any, head: TargetHead) -> torch.Tensor:
        return objective.count_targets(batch, head.t2d, self.options.num_depths, *self._cod())

    def objective(self, draft: torch.nn.Module, batch: Any, ctx: ObjectiveContext):
        return objective.micro_step(draft, batch, ctx, *self._cod())

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        return objective.summarize(totals)

    def display_metrics(self) -> dict[str, list[str]]:
        """Each depth's accuracy (acc_d: draft token d) and the acceptance length they imply."""
        return {"acc": [f"acc_{d}" for d in range(1, self.options.num_depths + 1)], "tau": ["accept_len"]}

    # ------------------------------------------------------------------------------ export / eval
    def export(self, draft: PEagleDraft, vocab: Any):
        return export_config(draft.config, getattr(draft, "aux_layer_ids", [])), export_tensors(draft, vocab)

    def proposer(self, export_dir: Any, target: Any, device: Any):
        from specforge_peagle.proposer import make_proposer

        return make_proposer(export_dir, target, device)

    # ------------------------------------------------------------------------------ plan
    def plan(self, config: Any, target: dict) -> DraftPlan:
        L_t = int(target["num_hidden_layers"])
        n_aux = len(config.model.aux_layers or self.default_aux_layers(L_t))
        vd = min(int(config.model.draft_vocab_size), int(target["vocab_size"]))
        c = self.draft_config(target, n_aux, vd)
        H, inter, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        first = 2 * H * (qd + 2 * kvd) + qd * H + 3 * H * inter + 3 * H  # 3 norms: + hidden_norm
        rest = H * (qd + 2 * kvd) + qd * H + 3 * H * inter + 2 * H
        embed = c.vocab_size * H
        # fc, mask_hidden, the layers, the final norm, lm_head
        trainable = n_aux * H * H + n_aux * H + first + (L - 1) * rest + H + vd * H
        trainable += embed if self.options.train_embedding else 0
        cb = 4 if config.training.dtype == "fp32" else 2
        # elements per token: the entry + its expected COD slots
        r, rmin = self.options.down_sample_ratio, self.options.down_sample_ratio_min
        slots = 1.0 + sum(max(r ** d, rmin) for d in range(1, c.num_depths))
        per_el = L * (6 * H + 2 * qd + 2 * kvd + 3 * inter) + 2 * H
        T = int(config.dataset.max_seq_length)
        # SDPA's memory-efficient kernel keeps no scores; the row's [N, N] attention mask (bool, its
        # construction temporaries and the kernel's additive copy) is what grows with T
        per_token = cb * (n_aux * H + H) + int(slots * cb * per_el + 8 * slots * slots * T)
        problems = []
        if int(config.eval.steps) > c.num_depths:
            problems.append(("warning", "eval.steps", f"{config.eval.steps} draft tokens per cycle but the draft is "
                             f"trained for {c.num_depths} (model.peagle.num_depths)"))
        return DraftPlan(
            shape={"hidden_size": H, "num_layers": L, "num_depths": c.num_depths, "draft_vocab_size": vd,
                   "mask_token_id": c.mask_token_id}, source="generated from the target",
            trainable_params=trainable, frozen_params=0 if self.options.train_embedding else embed,
            activation_bytes_per_token=per_token, frozen_bytes=cb * vd * H, problems=problems,
            memory_note=f"{slots:.1f} elements per token (COD)")


def make_peagle(options: PEagleOptions | None, config: Any = None) -> PEagleAlgorithm:
    return PEagleAlgorithm(options, config)


@hookimpl
def register_draft_algorithms(register):
    register("peagle", make_peagle, config=PEagleOptions,
             description="P-EAGLE: EAGLE-3 layers drafting all K tokens in one forward (vLLM eagle3 + parallel_drafting)")
