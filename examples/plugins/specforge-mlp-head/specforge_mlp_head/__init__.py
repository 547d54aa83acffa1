"""``mlp-head``: a one-layer MLP draft head (Medusa-like), as an outside draft algorithm.

Position t reads the target's aux hidden states at t and predicts x_{t+2}; the teacher is the
target's distribution at position t+1 (its lm_head on final_hidden[t+1]). The objective follows the
core's division of labour (``specforge_core.components``): the loss plugin returns sums over the
valid rows, this algorithm divides by the step's valid-row count ``ctx.denominators[0]``.

What the contracts ask of an algorithm, and where this file answers:

* features   ``FeatureSpec``: which captured tensors it reads, and its own default aux layers
             (here the middle and the deepest state, ``default_aux_layers``), used whenever
             ``model.aux_layers`` is unset (train, plan, validate, export, eval);
* objective  ``count_targets`` / ``objective`` / ``summarize``;
* export     ``export`` (config.json + tensors) and ``export_architectures``;
* proposer   ``proposer`` (``proposer.py``) so ``specforge eval`` measures it;
* sizing     ``plan``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from specforge_core import hookimpl
from specforge_core.components import DraftPlan, FeatureSpec
from specforge_core.config.fields import non_negative, option


@attrs.define
class MLPHeadOptions:
    hidden_size: int = option(0, "Width of the hidden layer (0 = the target's hidden size)", validator=non_negative)


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, draft_vocab: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)

    def forward(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.fc(aux_hidden))  # [.., hidden]; lm_head gives the logits


def _shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


ARCHITECTURE = "MLPHeadDraft"


def default_aux_layers(num_layers: int) -> list[int]:
    """The middle and the deepest residual stream the target exposes (HF hidden_states indices):
    a head that skips a token reads the top of the stack, not EAGLE-3's (2, L//2, L-3)."""
    return [num_layers // 2, num_layers - 1]


class MLPHeadAlgorithm:
    features = FeatureSpec(aux_hidden=True, final_hidden=True, target_argmax=True, block_size=1,
                           default_aux_layers=default_aux_layers)
    export_architectures = (ARCHITECTURE,)

    def __init__(self, options: MLPHeadOptions | None, config: Any = None):
        self.options = options or MLPHeadOptions()

    def _width(self, target_hidden: int) -> int:
        return self.options.hidden_size or target_hidden

    def build(self, target: Any, vocab: Any, weights: Any = None) -> MLPHead:
        layers = list(target.aux_layer_ids) or default_aux_layers(target.num_hidden_layers)
        head = MLPHead(len(layers) * target.hidden_size, self._width(target.hidden_size), int(vocab.d2t.numel()))
        head.aux_layer_ids = layers  # written to config.json by export: eval reads the same layers
        return head

    def _valid(self, batch: Any, t2d: torch.Tensor) -> torch.Tensor:
        T = batch.input_ids.shape[1]
        pos = torch.arange(T, device=batch.input_ids.device)
        in_range = pos[None, :] + 2 < batch.lengths[:, None]
        return in_range & _shift_left(batch.loss_mask, 2) & t2d[_shift_left(batch.target_argmax, 1)]

    def count_targets(self, batch: Any, head: Any) -> torch.Tensor:
        return self._valid(batch, head.t2d).sum().double().reshape(1)

    def objective(self, draft: MLPHead, batch: Any, ctx: Any):
        prepared = ctx.loss.prepare(batch.final_hidden.flatten(0, 1), ctx.head)
        hidden = draft(batch.aux_hidden).flatten(0, 1)
        n = hidden.shape[0]
        rows = (torch.arange(n, device=hidden.device) + 1).clamp(max=n - 1)  # teacher: position t+1
        valid = self._valid(batch, ctx.head.t2d).flatten()
        out = ctx.loss(hidden, draft.lm_head.weight, prepared, rows, valid)
        loss = out.loss_sum / ctx.denominators[0].clamp(min=1).to(out.loss_sum.dtype)
        stats = {"loss_sum": out.loss_sum.detach().double().reshape(1),
                 "correct": out.correct.double().reshape(1), "count": out.count.double().reshape(1)}
        return loss, stats

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        count = float(totals["count"][0])
        return {"loss_0": float(totals["loss_sum"][0]) / max(count, 1),
                "acc_0_invocab": float(totals["correct"][0]) / max(count, 1), "valid_tokens": count}

    def export(self, draft: MLPHead, vocab: Any):
        config = {"architectures": [ARCHITECTURE], "hidden_size": draft.fc.out_features,
                  "input_size": draft.fc.in_features, "draft_vocab_size": draft.lm_head.out_features,
                  "aux_layer_ids": [int(i) for i in draft.aux_layer_ids]}  # HF hidden_states indices
        state = {"fc.weight": draft.fc.weight.detach().to(torch.bfloat16),
                 "lm_head.weight": draft.lm_head.weight.detach().to(torch.bfloat16),
                 "d2t": vocab.d2t.to(torch.int64)}
        return config, state

    def proposer(self, export_dir: Any, target: Any, device: Any):
        from specforge_mlp_head.proposer import make_proposer

        return make_proposer(export_dir, target, device)

    def plan(self, config: Any, target: dict) -> DraftPlan:
        H = int(target["hidden_size"])
        n_aux = len(config.model.aux_layers or default_aux_layers(int(target["num_hidden_layers"])))
        width = self._width(H)
        vd = min(int(config.model.draft_vocab_size), int(target["vocab_size"]))
        c = 4 if config.training.dtype == "fp32" else 2
        problems = []
        if int(config.eval.steps) > 1:
            problems.append(("warning", "eval.steps", f"{config.eval.steps} draft tokens per cycle but one "
                             "mlp-head drafts 1 (specforge eval --steps 1)"))
        return DraftPlan(
            shape={"hidden_size": width, "draft_vocab_size": vd}, source="mlp-head options",
            trainable_params=n_aux * H * width + width * vd, frozen_params=0,
            activation_bytes_per_token=c * (n_aux * H + H + 3 * width),  # features + fc out + silu
            frozen_bytes=c * vd * H,  # the target head rows the loss reads
            problems=problems,
        )


def make_mlp_head(options: MLPHeadOptions | None, config: Any = None) -> MLPHeadAlgorithm:
    return MLPHeadAlgorithm(options, config)


@hookimpl
def register_draft_algorithms(register):
    register("mlp-head", make_mlp_head, config=MLPHeadOptions,
             description="example: one-layer MLP head over the aux hidden states (Medusa-like)")
