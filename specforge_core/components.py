"""The contracts a plugin implements, one per component kind.

A plugin registers a *factory* for each component under a name (see ``hookspecs``). The core calls
the factory with the structured config section of that component (an attrs instance of the class the
plugin registered, or ``None``) plus the arguments listed in each protocol below.

These are ``typing.Protocol`` classes: plugins need not inherit from them, only match them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ContextManager, Optional, Protocol, runtime_checkable

import attrs
import torch

from specforge_core.types import Sample, TargetFeatures, TargetInfo

# --------------------------------------------------------------------------------------------------
# Component kinds. The value is the config selector (``section.field``) that picks a component by
# name; a component's own options live in the table ``[section.<component-name>]``.
# --------------------------------------------------------------------------------------------------
KINDS: dict[str, tuple[str, str]] = {
    "draft_model": ("model", "draft"),
    "target_backend": ("inference", "backend"),
    "transfer_store": ("transfer", "store"),
    "loss": ("training", "loss"),
    "lr_scheduler": ("training", "scheduler"),
    "training_strategy": ("training", "strategy"),
}


# ----------------------------------------------------------------------------------------- draft
@runtime_checkable
class DraftModel(Protocol):
    """An EAGLE-3 style draft (a ``torch.nn.Module``).

    Factory: ``factory(options, target: TargetInfo, draft_vocab_size: int) -> DraftModel``.
    The trainer copies the target's embedding in with ``load_embedding`` (it stays frozen).
    """

    lm_head: torch.nn.Linear  # H -> draft vocab, no bias

    def load_embedding(self, weight: torch.Tensor) -> None: ...

    def ttt_forward(
        self,
        input_ids: torch.Tensor,  # int64 [B, T], unshifted
        aux_hidden: torch.Tensor,  # [B, T, n_aux*H_target]
        attention_mask: torch.Tensor,  # bool [B, T], True on real tokens (right padding)
        ttt_length: int,
    ) -> Iterator[torch.Tensor]:
        """Yield, for each TTT step k = 0..ttt_length-1, the *normed* hidden state [B, T, H]
        whose ``lm_head`` gives the step-k logits. Step k at position t consumes token x_{t+k+1}
        and predicts x_{t+k+2} (see docs/architecture.md, "Training-time test")."""
        ...

    def export_config(self) -> dict[str, Any]:
        """config.json for serving engines (architectures, sizes, rope, draft_vocab_size...)."""
        ...

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Serving-engine key names (fc.weight, midlayer.*, norm.weight, lm_head.weight)."""
        ...


# ---------------------------------------------------------------------------------------- target
@runtime_checkable
class TargetBackend(Protocol):
    """Runs the target LLM and captures EAGLE-3 features.

    Factory: ``factory(options, config: SpecforgeConfig, device: str | None) -> TargetBackend``.
    """

    info: TargetInfo

    def generate(self, samples: Sequence[Sample]) -> list[TargetFeatures]: ...

    def close(self) -> None: ...


# -------------------------------------------------------------------------------------- transfer
@runtime_checkable
class TransferStore(Protocol):
    """A key -> named-tensors store between inference producers and trainer consumers."""

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Store ``tensors`` under ``key``; return the exact number of payload bytes stored."""
        ...

    def get(self, key: str, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]: ...

    # Optional fast path (see training/staging.py): ``get_into(key, alloc)`` reads the sample into
    # ``alloc(nbytes)``, a uint8 buffer the caller owns (pinned, reused), and returns views of it.

    def delete(self, keys: Sequence[str]) -> None: ...

    def count(self) -> int:
        """Keys this run currently holds (a run must end at zero)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class TransferStoreProvider(Protocol):
    """What a transfer-store plugin registers as its factory result.

    Factory: ``factory(options) -> TransferStoreProvider``. The pipeline calls ``start`` once on the
    head (it may launch services, e.g. a Mooncake master), ships the picklable handle to every
    process, which calls ``connect``; ``stop`` runs at the end of the run, even after errors.
    """

    def start(self, run_id: str) -> Any: ...

    def connect(self, handle: Any) -> TransferStore: ...

    def stop(self, handle: Any) -> None: ...


# ------------------------------------------------------------------------------------------ loss
@attrs.define
class LossOutput:
    loss: torch.Tensor  # scalar, already weighted for this step, mean over valid positions
    raw_loss: torch.Tensor  # scalar, unweighted mean over valid positions (for logging), detached
    correct: torch.Tensor  # scalar int: argmax agreements on valid positions
    count: torch.Tensor  # scalar int: valid positions


class Loss(Protocol):
    """Factory: ``factory(options) -> Loss``.

    Called once per TTT step with flattened tokens; must not materialise more than one step's
    [tokens x draft_vocab] fp32 tensor at a time.

    Optional extension: a loss may define ``precompute_targets(final_hidden, target_head)``; the
    trainer then computes the target distribution once per micro-batch and passes step k
    ``targets=<result>.shifted(k + 1)`` as a keyword (see ``specforge_defaults.loss``). A loss
    without it is called exactly as below.
    """

    def __call__(
        self,
        step: int,
        draft_hidden: torch.Tensor,  # [N, H] normed draft hidden of this step
        draft_head: torch.Tensor,  # [Vd, H] draft lm_head weight (trainable)
        target_hidden: torch.Tensor,  # [N, H] target final (post-norm) hidden, aligned to this step
        target_head: torch.Tensor,  # [Vd, H] target lm_head rows of the draft vocab (frozen)
        valid: torch.Tensor,  # bool [N]
    ) -> LossOutput: ...


# ----------------------------------------------------------------------------------- lr schedule
# Factory: ``factory(options, total_steps: int, warmup_steps: int) -> LRLambda``; the trainer wraps
# it in ``torch.optim.lr_scheduler.LambdaLR`` (multiplier of the base learning rate).
LRLambda = Callable[[int], float]


# ------------------------------------------------------------------------------------- strategy
class TrainingStrategy(Protocol):
    """How the draft is placed, wrapped, synchronised and checkpointed.

    Factory: ``factory(options, config: SpecforgeConfig) -> TrainingStrategy``. The process group
    (if any) is already initialised by the caller (``torch.distributed``) when the factory runs.
    """

    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        """Context for accumulation micro-steps: no gradient reduction inside it."""
        ...

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float: ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity for one process)."""
        ...

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Unsharded trainable+buffer state on rank 0 (other ranks may return {})."""
        ...

    def save_checkpoint(
        self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> None:
        """Write model+optimizer state and ``extra`` (picklable) *atomically* to directory ``path``."""
        ...

    def load_checkpoint(
        self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict: ...

    def barrier(self) -> None: ...


def null_context() -> ContextManager:
    return contextlib.nullcontext()
