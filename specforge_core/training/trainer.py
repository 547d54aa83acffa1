"""``Eagle3Trainer``: one optimizer step of EAGLE-3 training-time-test (TTT) on given features.

The trainer owns the draft, its optimizer and LR schedule. It does not know where features come
from (local loop, Ray actor, ...): callers hand ``train_step`` micro-batches of ``TargetFeatures``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from specforge_core.config.schema import SpecforgeConfig
from specforge_core.training.alignment import align_step, align_valid
from specforge_core.training.batch import Batch, collate
from specforge_core.training.components import create
from specforge_core.training.staging import StagedBatch
from specforge_core.types import TargetFeatures, TargetInfo

MicroBatch = Sequence[TargetFeatures] | Batch | StagedBatch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def as_batch(micro: MicroBatch, device: torch.device, dtype: torch.dtype) -> Batch:
    if isinstance(micro, StagedBatch):
        return micro.ready()
    if isinstance(micro, Batch):
        return micro
    return collate(micro, device, dtype)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def acceptance_length(accs: Sequence[float]) -> float:
    """Simulated greedy-chain acceptance length: 1 + sum_k prod_{j<=k} acc_j."""
    total, prod = 1.0, 1.0
    for a in accs:
        prod *= a
        total += prod
    return total


def micro_step(ttt_forward, head, loss_fn, batch, target_head, t2d, K):
    """TTT unroll + loss of one micro-batch: ``(summed step losses, stats [4, K] float64)`` with
    rows raw-loss sum, correct, count, weighted-loss sum (token-weighted sums per TTT step)."""
    stats = torch.zeros(4, K, dtype=torch.float64, device=batch.input_ids.device)
    total = None
    # Optional Loss extension: the target distribution of every position once per micro-batch
    # (step k reads it shifted by k+1) instead of one target-head GEMM + softmax per TTT step.
    pre = getattr(loss_fn, "precompute_targets", None)
    targets = pre(batch.final_hidden, target_head) if pre is not None else None
    for k, hidden in enumerate(ttt_forward(batch.input_ids, batch.aux_hidden, batch.attention_mask, K)):
        if targets is None:
            target_hidden, valid = align_step(batch, k, t2d)
            extra = {}
        else:
            # With precomputed targets the loss reads ``targets`` (shifted by index arithmetic) and
            # only shape-checks target_hidden: pass the unshifted features, no [B, T, H] copy per step.
            target_hidden, valid = batch.final_hidden, align_valid(batch, k, t2d)
            extra = {"targets": targets.shifted(k + 1)}
        out = loss_fn(k, hidden.flatten(0, 1), head, target_hidden.flatten(0, 1), target_head, valid.flatten(),
                      **extra)
        total = out.loss if total is None else total + out.loss
        stats[0, k] += out.raw_loss.detach().double() * out.count
        stats[1, k] += out.correct
        stats[2, k] += out.count
        stats[3, k] += out.loss.detach().double() * out.count
    return total, stats


class DraftStep(torch.nn.Module):
    """The draft plus its loss as one module whose ``forward`` is one micro-step (what FSDP2's
    hooks need: ``lm_head.weight`` is read inside forward, where it is unsharded)."""

    def __init__(self, draft: torch.nn.Module, loss_fn: Any, ttt_length: int):
        super().__init__()
        self.draft, self.loss_fn, self.ttt_length = draft, loss_fn, ttt_length

    def forward(self, batch: Any, target_head: torch.Tensor, t2d: torch.Tensor):
        return micro_step(self.draft.ttt_forward, self.draft.lm_head.weight, self.loss_fn, batch,
                          target_head, t2d, self.ttt_length)


class Eagle3Trainer:
    def __init__(
        self,
        config: SpecforgeConfig,
        target: TargetInfo,
        vocab: Any,  # specforge_core.vocab.VocabMapping
        total_steps: int,
        strategy: Any = None,
    ):
        t = config.training
        self.config = config
        self.total_steps = total_steps
        self.ttt_length = t.ttt_length
        self.step = 0  # optimizer steps done

        self.strategy = strategy if strategy is not None else create(config, "training_strategy", config)
        self.device = torch.device(self.strategy.device)
        self.dtype = resolve_dtype(t.dtype, self.device)

        # Draft: seeded init so runs (and ranks) start from the same weights.
        torch.manual_seed(config.run.seed)
        self.draft = create(config, "draft_model", target, int(vocab.d2t.numel()))
        from specforge_core.target import load_target_head_and_embedding

        embed, head_rows = load_target_head_and_embedding(
            target.model_path, row_ids=vocab.draft_to_target_ids, dtype=torch.float32
        )
        self.draft.load_embedding(embed)
        self.loss_fn = create(config, "loss")
        # Strategies other than 'local' (e.g. fsdp2) gather params and reduce grads from forward
        # hooks: they get a module whose forward runs the whole micro-step (state keys "draft.*").
        wrap = t.strategy != "local"
        self.model = self.strategy.prepare(DraftStep(self.draft, self.loss_fn, t.ttt_length) if wrap else self.draft)
        # Frozen target lm_head rows of the draft vocab, in compute dtype.
        self.target_head = head_rows.to(self.device, self.dtype)
        self.t2d = vocab.t2d.to(self.device)

        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused AdamW (one kernel over all params) on CUDA with plain tensors ('local'); sharded
        # strategies keep the default implementation
        fused = self.device.type == "cuda" and not wrap
        self.optimizer = torch.optim.AdamW(
            params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused or None
        )
        warmup = int(round(t.warmup_ratio * total_steps))
        lr_lambda = create(config, "lr_scheduler", total_steps, warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    # ------------------------------------------------------------------------------------ steps
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _ttt_forward(self, *args):
        fwd = getattr(self.model, "ttt_forward", None) or self.model.module.ttt_forward
        return fwd(*args)

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns metrics.

        A micro-batch is a list of ``TargetFeatures`` (collated here), or a ``Batch`` / a
        ``StagedBatch`` already collated on the device (the Ray trainer's prefetch thread)."""
        if not micro_batches:
            raise ValueError("train_step: no micro-batches")
        start = time.perf_counter()
        K = self.ttt_length
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # rows per TTT step: raw-loss sum, correct, count, weighted-loss sum (token-weighted sums)
        stats = torch.zeros(4, K, dtype=torch.float64, device=self.device)
        tokens = 0
        n = len(micro_batches)
        for i, features in enumerate(micro_batches):
            batch = as_batch(features, self.device, self.dtype)
            tokens += batch.num_tokens
            sync = contextlib.nullcontext() if i == n - 1 else self.strategy.no_sync(self.model)
            with sync:
                with self._autocast():
                    if isinstance(self.model, DraftStep):  # FSDP2-style: all param work in forward
                        total, micro_stats = self.model(batch, self.target_head, self.t2d)
                    else:
                        total, micro_stats = micro_step(
                            self._ttt_forward, self.draft.lm_head.weight, self.loss_fn, batch,
                            self.target_head, self.t2d, K,
                        )
                    stats += micro_stats
                # Equal weight per micro-batch: each loss is already a per-token mean.
                (total / n).backward()

        max_norm = self.config.training.max_grad_norm
        grad_norm = self.strategy.clip_grad_norm(self.model, max_norm if max_norm > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1

        totals = torch.cat([stats.flatten(), torch.tensor([tokens], dtype=torch.float64, device=self.device)])
        totals = self.strategy.all_reduce(totals).cpu()
        stats, tokens_all = totals[:-1].view(4, K), float(totals[-1])
        elapsed = time.perf_counter() - start
        count = stats[2].clamp(min=1)
        losses = (stats[0] / count).tolist()
        accs = (stats[1] / count).tolist()
        metrics: dict[str, float] = {
            "step": self.step,
            "loss": float((stats[3] / count).sum()),  # the optimised (step-weighted) loss
            "accept_len": acceptance_length(accs),
            "tokens": tokens_all,
            "tokens_per_s": tokens_all / max(elapsed, 1e-9),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "valid_tokens": float(stats[2, 0]),
        }
        for k in range(K):
            metrics[f"loss_{k}"] = losses[k]
            metrics[f"acc_{k}"] = accs[k]
        return metrics

    # ---------------------------------------------------------------------------- checkpointing
    def state(self) -> dict[str, Any]:
        """What a checkpoint needs besides model and optimizer (picklable)."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
