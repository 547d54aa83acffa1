"""``Trainer``: one optimizer step of a draft algorithm's objective on given features.

The trainer owns the draft, its optimizer and LR schedule, and is generic over the draft algorithm
(``components.DraftAlgorithm``): the algorithm builds the draft, computes the loss of a micro-batch
and turns summed statistics into metrics. The trainer does not know where features come from
(local loop, Ray actor, ...): callers hand ``train_step`` micro-batches of ``TargetFeatures``.

Normalisation: before the step's first forward the trainer asks the algorithm for each
micro-batch's loss denominators (``count_targets``, from masks only), sums them over micro-batches
and ranks (one small all-reduce), and hands the totals to every ``objective`` call. Each micro-batch
loss is then its share of the step's token-weighted objective: backpropagated as is (gradients are
summed over micro-batches and ranks), and the logged ``loss`` is their sum over micro-batches and
ranks, the optimised value.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from specforge_core import dtypes
from specforge_core.components import ObjectiveContext, TargetHead, capability
from specforge_core.config.schema import SpecforgeConfig
from specforge_core.export import ALGORITHM_ATTR
from specforge_core.hfconfig import final_logit_softcap
from specforge_core.training.batch import Batch
from specforge_core.training.components import algorithm as build_algorithm
from specforge_core.training.components import create
from specforge_core.training.frozen import TargetWeights
from specforge_core.training.packing import assemble, pack_step
from specforge_core.training.staging import StagedBatch
from specforge_core.types import TargetFeatures, TargetInfo

MicroBatch = Sequence[TargetFeatures] | Batch | StagedBatch

def as_batch(micro: MicroBatch, device: torch.device, dtype: torch.dtype, pack_tokens: int = 0) -> Batch:
    if isinstance(micro, StagedBatch):
        return micro.ready()
    if isinstance(micro, Batch):
        return micro
    return assemble(micro, device, dtype, pack_tokens)


class DraftStep(torch.nn.Module):
    """The draft plus its objective as one module whose ``forward`` is one micro-step (what FSDP2's
    hooks need: every parameter is read inside forward, where it is unsharded). State keys are
    ``draft.*``."""

    def __init__(self, draft: torch.nn.Module, algorithm: Any):
        super().__init__()
        self.draft = draft
        self.algorithm = algorithm

    def forward(self, batch: Any, ctx: ObjectiveContext):
        return self.algorithm.objective(self.draft, batch, ctx)


class Trainer:
    def __init__(
        self,
        config: SpecforgeConfig,
        target: TargetInfo,
        vocab: Any,  # specforge_core.vocab.VocabMapping
        total_steps: int,
        strategy: Any = None,
        registry: Any = None,  # the plugin registry (None: the process-wide one)
    ):
        t = config.training
        self.config = config
        self.registry = registry
        self.total_steps = total_steps
        self.step = 0  # optimizer steps done

        self.strategy = strategy if strategy is not None else create(config, "training_strategy", config,
                                                                      registry=registry)
        self.device = torch.device(self.strategy.device)
        self.dtype = dtypes.resolve(t.dtype, self.device, "training.dtype")

        self.algorithm = build_algorithm(config, registry)
        if t.pack_tokens and not self.algorithm.features.packed_rows:
            raise ValueError(f"training.pack_tokens = {t.pack_tokens}: draft '{config.model.draft}' does not accept "
                             "packed rows; set training.pack_tokens = 0")
        if t.token_budget and not t.pack_tokens:
            raise ValueError("training.token_budget = true needs training.pack_tokens > 0 (the row length, e.g. 8192)")
        if t.pack_tokens and t.pack_tokens < config.dataset.max_seq_length:
            raise ValueError(f"training.pack_tokens = {t.pack_tokens} is below dataset.max_seq_length = "
                             f"{config.dataset.max_seq_length}: the longest samples would not fit a row")
        # Draft: seeded init so runs (and ranks) start from the same weights.
        torch.manual_seed(config.run.seed)
        weights = TargetWeights(target.model_path, vocab)
        self.draft = self.algorithm.build(target, vocab, weights)
        setattr(self.draft, ALGORITHM_ATTR, self.algorithm)  # export_draft(trainer.draft, ...) finds it
        self.loss_fn = create(config, "loss", registry=registry)
        # Strategies that gather params and reduce grads from forward hooks (e.g. FSDP2) get a
        # module whose forward runs the whole micro-step (state keys "draft.*").
        self.wrapped = bool(capability(self.strategy, "TrainingStrategy.wraps_step"))
        self.model = self.strategy.prepare(DraftStep(self.draft, self.algorithm) if self.wrapped else self.draft)
        # Frozen target lm_head rows of the draft vocab, in compute dtype.
        device, dtype = self.device, self.dtype
        self.head = TargetHead(
            rows=weights.head_rows().to(device, dtype), t2d=vocab.t2d.to(device),
            draft_ids=vocab.draft_to_target_ids.to(device),
            full_loader=lambda: weights.full_head().to(device, dtype),
            logit_softcap=final_logit_softcap(target.hf_config),  # Gemma 2's, applied by the losses
        )
        weights.release()

        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused AdamW (one kernel over all params) on CUDA with plain tensors; strategies that wrap
        # the step (sharded DTensors) keep the default implementation
        fused = self.device.type == "cuda" and not self.wrapped
        self.optimizer = torch.optim.AdamW(
            params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused or None
        )
        warmup = int(round(t.warmup_ratio * total_steps))
        lr_lambda = create(config, "lr_scheduler", total_steps, warmup, registry=registry)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    # the target head rows and draft-vocab mask (names kept from the EAGLE-3 trainer)
    @property
    def target_head(self) -> torch.Tensor:
        return self.head.rows

    @property
    def t2d(self) -> torch.Tensor:
        return self.head.t2d

    # ------------------------------------------------------------------------------------ steps
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _objective(self, batch: Batch, ctx: ObjectiveContext):
        if self.wrapped:  # FSDP2-style: all parameter work inside the wrapper's forward
            return self.model(batch, ctx)
        return self.algorithm.objective(self.draft, batch, ctx)

    def _assemble(self, micro_batches: Sequence[MicroBatch]) -> list[Batch]:
        """Device batches of the step. With ``training.pack_tokens`` and samples given as lists, the
        whole step's samples are packed into rows and regrouped into micro-batches of
        ``micro_batch_size`` rows (one shape every micro-step; the step's objective is unchanged:
        it is token-weighted over the whole step)."""
        t = self.config.training
        if t.pack_tokens and all(not isinstance(m, (Batch, StagedBatch)) for m in micro_batches):
            return pack_step([f for m in micro_batches for f in m], t.pack_tokens, t.micro_batch_size,
                             self.device, self.dtype)
        return [as_batch(m, self.device, self.dtype, t.pack_tokens) for m in micro_batches]

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns metrics.

        A micro-batch is a list of ``TargetFeatures`` (collated here), or a ``Batch`` / a
        ``StagedBatch`` already collated on the device (the Ray trainer's prefetch thread)."""
        if not micro_batches:
            raise ValueError("train_step: no micro-batches")
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = self._assemble(micro_batches)
        # The step's loss denominators first: from masks only, summed over micro-batches and ranks.
        with torch.no_grad():
            local = sum(self.algorithm.count_targets(b, self.head) for b in batches)
            tokens = torch.tensor([float(sum(b.num_tokens for b in batches))], dtype=torch.float64,
                                  device=local.device)
            counts = self.strategy.all_reduce(torch.cat([local.double(), tokens]))
        denominators, tokens_all = counts[:-1], float(counts[-1])
        ctx = ObjectiveContext(loss=self.loss_fn, head=self.head, denominators=denominators)

        totals: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = len(batches)
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == n - 1 else self.strategy.no_sync(self.model)
            with sync:
                with self._autocast():
                    loss, stats = self._objective(batch, ctx)
                for name, value in stats.items():
                    value = value.detach().double()
                    totals[name] = value if name not in totals else totals[name] + value
                loss_sum += loss.detach().double()
                # already this micro-batch's share of the step's objective: no 1/n here
                loss.backward()

        max_norm = self.config.training.max_grad_norm
        grad_norm = self.strategy.clip_grad_norm(self.model, max_norm if max_norm > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1

        # one all-reduce of every statistic (and the loss) over ranks
        names = sorted(totals)
        flat = torch.cat([loss_sum.reshape(1)] + [totals[k].reshape(-1) for k in names])
        flat = self.strategy.all_reduce(flat).cpu()
        reduced, offset = {}, 1
        for k in names:
            size = totals[k].numel()
            reduced[k] = flat[offset : offset + size].view(totals[k].shape)
            offset += size
        elapsed = time.perf_counter() - start
        metrics: dict[str, float] = {
            "step": self.step,
            "loss": float(flat[0]),  # the optimised objective of this step
            "tokens": tokens_all,
            "tokens_per_s": tokens_all / max(elapsed, 1e-9),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        metrics.update(self.algorithm.summarize(reduced))
        return metrics

    # ---------------------------------------------------------------------------- checkpointing
    def state(self) -> dict[str, Any]:
        """What a checkpoint needs besides model and optimizer (picklable)."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
