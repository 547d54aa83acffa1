"""The contracts a plugin implements, one per component kind.

A plugin registers a *factory* for each component under a name (see ``hookspecs``). The core calls
the factory with the structured config section of that component (an attrs instance of the class the
plugin registered, or ``None``) plus the arguments listed in each protocol below.

These are ``typing.Protocol`` classes: plugins need not inherit from them, only match them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ContextManager, Optional, Protocol, runtime_checkable

import attrs
import torch

# The table of component kinds lives in ``hookspecs`` (torch-free: light processes import it);
# re-exported here because each row names its contract in this module.
from specforge_core.hookspecs import KINDS, Kind  # noqa: F401
from specforge_core.types import Sample, TargetFeatures, TargetInfo


# ============================================================================ draft algorithm
# The unit a draft plugin provides. The core (trainer, pipelines, export, plan, checks) is generic
# over it and never names one. Division of labour for the training objective:
#
#   core (trainer)  collates micro-batches (``training.batch.Batch``), asks the algorithm for the
#                   step's loss denominators first (``count_targets``, summed over micro-batches
#                   and ranks), runs ``objective`` per micro-batch inside ``DraftStep.forward``,
#                   backpropagates the returned loss as is, sums the returned statistics over
#                   micro-batches and ranks and hands them to ``summarize``.
#   algorithm       the draft's forward (e.g. EAGLE-3's training-time-test unroll), the alignment
#                   (which target position teaches which draft output, which are valid), the
#                   prediction *groups* (EAGLE-3: one per TTT step), their weights (EAGLE-3:
#                   0.8**k) and the normalisation: group g's summed per-token loss is divided by
#                   ``ctx.denominators[g]`` (valid targets of group g in the whole optimizer step,
#                   all micro-batches, all ranks), so the step's objective does not depend on how
#                   its samples are split into micro-batches or ranks.
#   loss plugin     a per-token divergence between the draft's distribution and the target's on
#                   the rows the algorithm marks valid: returns the *sum* over those rows (no
#                   weighting, no normalisation) plus argmax agreements (see ``Loss``).
# ============================================================================================
@attrs.frozen
class FeatureSpec:
    """Which target features an algorithm trains on (what inference captures per token).

    Today every target backend captures the fields of ``types.TargetFeatures``: ``input_ids``,
    ``loss_mask``, ``aux_hidden`` (the residual stream entering ``model.aux_layers``, concatenated),
    ``final_hidden`` (post-norm) and ``target_argmax`` (full-vocab argmax). The spec says which of
    them the algorithm reads; ``plan`` sizes transfers from it.
    """

    aux_hidden: bool = True
    final_hidden: bool = True
    target_argmax: bool = True
    # Tokens the draft proposes per forward at inference (EAGLE-3: 1, chained; DFlash: its block).
    block_size: int = 1
    # Default aux layers for a target of L layers when ``model.aux_layers`` is empty (HF
    # hidden_states indices). None: the EAGLE-3 default (2, L//2, L-3).
    default_aux_layers: Optional[Callable[[int], list[int]]] = None
    # Whether ``objective`` accepts packed micro-batches (``training.pack_tokens``; see
    # ``training/packing.py``: ``Batch.doc_ids`` / ``position_ids``) and keeps attention and targets
    # inside each document. A run that packs for an algorithm without it is refused.
    packed_rows: bool = False


@attrs.define
class TargetHead:
    """The frozen target weights a trainer hands an objective (and its loss), on the device.

    ``rows`` [Vd, H] are the target lm_head rows of the draft vocabulary in draft order (compute
    dtype), ``t2d`` bool [V] marks target ids in the draft vocab, ``draft_ids`` int64 [Vd] is the
    target id of each draft id. ``full()`` loads the *whole* target lm_head [V, H] on first call
    (cached) for losses that need the target's full-vocab distribution (``Loss.needs_full_vocab``).
    """

    rows: torch.Tensor
    t2d: torch.Tensor
    draft_ids: torch.Tensor
    full_loader: Optional[Callable[[], torch.Tensor]] = None
    _full: Optional[torch.Tensor] = None

    def full(self) -> torch.Tensor:
        if self._full is None:
            if self.full_loader is None:
                raise RuntimeError("the full target lm_head was not made available to this objective")
            self._full = self.full_loader()
        return self._full


@attrs.define
class ObjectiveContext:
    """What ``DraftAlgorithm.objective`` receives besides the draft and the batch."""

    loss: Loss  # the configured loss plugin
    head: TargetHead
    # float64 [G]: valid targets of each prediction group g in the whole optimizer step (all
    # micro-batches, all ranks): the sum of ``count_targets`` over them. Divide group g by it.
    denominators: torch.Tensor


@attrs.define
class DraftPlan:
    """An algorithm's contribution to ``specforge plan`` and ``config validate`` (arithmetic only)."""

    shape: dict[str, Any]  # printable architecture facts (hidden, heads, draft vocab...)
    source: str  # where the shape came from ("generated from the target", a file path...)
    trainable_params: int
    frozen_params: int  # frozen target weights the draft holds (e.g. the token embedding)
    # Bytes one token of a micro-batch keeps for backward through the whole objective (all
    # groups/steps), and per micro-batch independently of its length (e.g. a head gradient).
    activation_bytes_per_token: int
    activation_bytes_fixed: int = 0
    frozen_bytes: int = 0  # device bytes of frozen weights (embedding, target head rows...)
    # config problems: (level "error"|"warning", dotted config key, message)
    problems: list[tuple[str, str, str]] = attrs.Factory(list)


@runtime_checkable
class DraftAlgorithm(Protocol):
    """A draft-model training algorithm (EAGLE-3, DFlash, ...): registered under the name that
    ``model.draft`` selects, options in ``[model.<name>]``.

    Factory: ``factory(options, config: SpecforgeConfig) -> DraftAlgorithm``. It must be cheap
    (no weights, no device work): ``plan`` and ``config validate`` build it too.
    """

    features: FeatureSpec

    def build(self, target: TargetInfo, vocab: Any, weights: Any = None) -> torch.nn.Module:
        """The trainable draft module. ``vocab`` is the run's ``vocab.VocabMapping``; ``weights``
        (a ``target.TargetWeights`` or None) gives the frozen target tensors to copy in (token
        embedding...); None when the caller loads a trained state next (export, eval). The
        trainer seeds torch before calling, so every rank starts from the same weights."""
        ...

    def count_targets(self, batch: Any, head: TargetHead) -> torch.Tensor:
        """float64 [G] on the batch's device: valid targets of each prediction group in this
        micro-batch (``training.batch.Batch``), from its masks only (cheap, no forward). The
        trainer sums them over the step's micro-batches and ranks into ``denominators``."""
        ...

    def objective(self, draft: torch.nn.Module, batch: Any, ctx: ObjectiveContext
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, stats)`` of one micro-batch. ``loss``: a differentiable scalar, already
        normalised with ``ctx.denominators`` (the trainer backpropagates it as is, and the logged
        loss is the sum of these over micro-batches and ranks: the optimised objective). ``stats``:
        *additive* detached tensors (sums and counts, any shape, fixed per algorithm) that the
        trainer sums over micro-batches and ranks and passes to ``summarize``.

        Runs inside ``DraftStep.forward`` (so sharding strategies gather parameters around it):
        read every parameter through ``draft``, call the loss as ``ctx.loss``."""
        ...

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Logged metrics from the step's summed ``stats`` (e.g. ``acc_k``, ``accept_len``).
        The trainer adds ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``."""
        ...

    def export(self, draft: torch.nn.Module, vocab: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(config.json dict, tensors)`` in the layout the serving engines load (keys, dtypes,
        vocab maps...). ``export.write_export`` writes them atomically as they are."""
        ...

    def plan(self, config: Any, target: dict) -> DraftPlan:
        """Sizes and config problems from the config and the target's config.json dict alone."""
        ...

    # ---- Optional, for ``specforge eval`` (see "evaluation" at the end of this module):
    #   export_architectures: tuple[str, ...]   config.json ``architectures`` its export writes
    #       (how ``specforge eval --draft DIR`` finds the algorithm without a run config)
    #   proposer(self, export_dir, target: EvalTarget, device) -> Proposer



# ---------------------------------------------------------------------------------------- target
@runtime_checkable
class TargetBackend(Protocol):
    """Runs the target LLM and captures EAGLE-3 features.

    Factory: ``factory(options, config: SpecforgeConfig, device: str | None) -> TargetBackend``.
    """

    info: TargetInfo

    def generate(self, samples: Sequence[Sample]) -> list[TargetFeatures]: ...

    def close(self) -> None: ...

    # Optional (``specforge data regenerate``): text generation by the same target, batched by the
    # backend. ``generate_text(prompts, params) -> list[GeneratedText]``, one per prompt, in order;
    # prompts are token ids (the caller applies the chat template the training uses). A backend
    # without it cannot regenerate data; callers check with ``hasattr(backend, "generate_text")``.


@attrs.define
class GenerationParams:
    """Sampling settings of ``TargetBackend.generate_text`` (temperature 0 = greedy)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = attrs.Factory(list)  # stop strings (not part of the returned text)
    stop_token_ids: list[int] = attrs.Factory(list)  # extra stop tokens besides the target's EOS
    seed: Optional[int] = None  # per-request seed for sampled generation (None: the engine's)


@attrs.define
class GeneratedText:
    token_ids: list[int]  # generated tokens, including the EOS / stop token that ended them, if any
    text: str  # decoded without special tokens, without a matched stop string
    finish_reason: str  # "stop" (EOS, stop token or string) or "length" (max_new_tokens reached)


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

    # Optional capability ``supplies_features = True``: the store serves the target's features from
    # storage written beforehand (``specforge data features``), so pipelines build no target backend.
    # Such a provider also has ``dir``, ``format``, ``shard_samples`` (where and how the cache is
    # written), ``encode(tensors) -> tensors`` / ``decode(stored, dtype) -> tensors`` (its storage
    # codec) and ``feature_source(config) -> TargetBackend`` (reads the cache; see data/features.py).


# ------------------------------------------------------------------------------------------ loss
@attrs.define
class LossOutput:
    loss_sum: torch.Tensor  # scalar, differentiable: SUM over valid rows of the per-token loss
    correct: torch.Tensor  # scalar int: valid rows whose draft argmax == the target's draft-vocab argmax
    count: torch.Tensor  # scalar int: valid rows


class Loss(Protocol):
    """A per-token divergence between the draft's and the target's next-token distributions.

    Factory: ``factory(options) -> Loss`` (cheap; ``plan`` builds it too).

    The contract, in call order, once per micro-batch (called by the algorithm's ``objective``):

    1. ``prepared = loss.prepare(final_hidden, head)`` with ``final_hidden`` [N, H] the target's
       post-norm final hidden state at every position of the micro-batch (rows b*T + t) and
       ``head`` the ``TargetHead`` (draft-vocab rows of the target lm_head, ``t2d``, ``draft_ids``
       and, if the loss sets ``needs_full_vocab = True``, ``head.full()``: the whole [V, H] target
       lm_head, for losses that need the target's probability mass outside the draft vocab).
       No gradient. The result is the loss's own (e.g. forward-kl: the target softmax over the
       draft vocab of every position, computed once and shared by all prediction groups).
    2. For each prediction group: ``loss(draft_hidden, draft_head, prepared, target_rows, valid)``
       with ``draft_hidden`` [N, H] the draft's normed hidden state, ``draft_head`` [Vd, H] its
       lm_head weight (trainable), ``target_rows`` int64 [N] the row of ``final_hidden`` that
       teaches each draft row (only read where ``valid``), ``valid`` bool [N].

    The loss returns SUMS over valid rows (``LossOutput``); weighting across groups and the
    normalisation are the algorithm's (see "Division of labour" above). A loss must not hold more
    than about one group's [tokens x draft_vocab] fp32 tensor at a time.

    Optional fast path, for algorithms that know every group's valid rows and weight before the
    forward (EAGLE-3: the step masks, and decay**k over the step's denominators):
    ``groups = loss.weighted_groups(prepared, valid, weights)`` with ``valid`` bool [G, N] and
    ``weights`` [G], then per group ``groups.add(g, draft_hidden, draft_head, target_rows)``
    (returns the group's ``LossOutput`` with detached sums), then ``groups.finish()``: the
    differentiable ``sum_g weights[g] * loss_sum_g``, backpropagated once. Same value and gradients
    as the per-group calls; a loss can then find all groups' rows with one host sync, cast the
    draft head once and accumulate its gradient in one buffer (forward-kl: ~6 ms of 76 and 2.3 GiB
    less per micro-step at an 8B-shaped draft, T = 2048, on an H200; docs/performance.md).
    """

    needs_full_vocab: bool  # optional attribute; absent = False

    def prepare(self, final_hidden: torch.Tensor, head: TargetHead) -> Any: ...

    def __call__(
        self,
        draft_hidden: torch.Tensor,
        draft_head: torch.Tensor,
        prepared: Any,
        target_rows: torch.Tensor,
        valid: torch.Tensor,
    ) -> LossOutput: ...


# ----------------------------------------------------------------------------------- lr schedule
# Factory: ``factory(options, total_steps: int, warmup_steps: int) -> LRLambda``; the trainer wraps
# it in ``torch.optim.lr_scheduler.LambdaLR`` (multiplier of the base learning rate).
LRLambda = Callable[[int], float]


# ------------------------------------------------------------------------------------- strategy
class TrainingStrategy(Protocol):
    """How the draft is placed, wrapped, synchronised and checkpointed.

    Factory: ``factory(options, config: SpecforgeConfig) -> TrainingStrategy``. The process group
    (if any) is already initialised by the caller (``torch.distributed``) when the factory runs; a
    factory that needs one even for a single rank sets ``factory.needs_process_group = True``.

    Gradients are SUMMED over ranks (not averaged): each rank's loss is already divided by the
    whole step's token count (``ObjectiveContext.denominators``).

    Optional attribute ``wraps_step = True``: ``prepare`` then receives a ``training.trainer.DraftStep``
    (the draft plus its objective; ``forward`` runs one whole micro-step, state keys ``draft.*``)
    instead of the bare draft, for strategies that gather parameters and reduce gradients from
    forward hooks (FSDP2).
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


# ------------------------------------------------------------------------------------- planning
# ``specforge plan`` and ``config validate`` are arithmetic on the config: they never start a
# backend or a strategy. Components contribute through optional methods on their *options class*
# (the attrs config they registered), called with ``getattr``; none is required:
#
#   engine_nodes(self) -> int
#       target backends: nodes one inference engine spans (default 1).
#   train_state_split(self, num_gpus: int) -> tuple[int, bool]
#       training strategies: (ranks the fp32 params, grads and optimizer state are sharded over,
#       whether that state lives in CPU memory). Default (1, False).
#   plan_notes(self, config, plan: dict) -> PlanNotes
#       any component: extra facts for ``plan`` (stored as ``plan[<component name>]``), lines
#       ``specforge plan`` prints, and config problems ``config validate`` reports.
#
# Losses contribute with an optional method on the loss object (losses are cheap to build):
#   workspace_bytes(self, tokens: int, draft_vocab: int) -> int
#       transient device bytes per micro-batch of ``tokens`` tokens (chunk buffers, precomputed
#       target distributions...).
# The draft algorithm contributes ``DraftAlgorithm.plan``.
@attrs.define
class PlanNotes:
    facts: Any = None
    lines: list[str] = attrs.Factory(list)
    problems: list[tuple[str, str, str]] = attrs.Factory(list)  # (level, dotted key, message)


def null_context() -> ContextManager:
    return contextlib.nullcontext()


# ================================================================================ evaluation
# ``specforge eval`` is generic over two plugin-provided parts:
#
#   proposer     the draft side of greedy speculation (``Proposer``), given by the draft algorithm:
#                ``DraftAlgorithm.proposer(export_dir, target: EvalTarget, device) -> Proposer``.
#                The core runs the target, verifies, rolls back, counts and guards; the proposer
#                only turns committed tokens + target features into the next K draft tokens.
#   eval engine  optional: a serving engine that measures the same export end to end (e.g. vLLM).
#                Registered through the ``register_eval_engines`` hook: ``register(name, run,
#                description=...)`` with ``run(request: EvalRequest) -> EvalReport`` (see
#                ``evaluation.engines``). The in-process engine ``hf`` is the core's own.
@runtime_checkable
class EvalTarget(Protocol):
    """What a proposer may read from the target during ``specforge eval`` (frozen, on ``device``)."""

    hf_config: dict  # the target's config.json
    num_layers: int
    device: torch.device
    dtype: torch.dtype

    def embedding(self) -> torch.Tensor:
        """[V, H] token embedding (drafts that share it: EAGLE-3, DFlash)."""
        ...

    def lm_head(self) -> torch.Tensor:
        """[V, H] output head (drafts that share it: DFlash)."""
        ...


@runtime_checkable
class Proposer(Protocol):
    """The draft side of greedy speculation, batched over R rows (one prompt each).

    Indexing: row r's committed sequence is x[0..n]; the target has run x[0..n-1] and produced
    features f[0..n-1] (``f[p]`` = the concatenated ``aux_layers`` hidden states at position p, the
    state that predicted x[p+1]). ``x[n]`` (the last committed token, the bonus of the last cycle)
    has no features yet: the next verification computes them.

    Call order per batch: ``begin(prompts)``, then ``observe`` with the prefill (tokens x[1..P],
    features f[0..P-1]), then per cycle ``propose(K)``, the target verifies, ``observe`` with the
    cycle's committed tokens and their features, ``keep`` drops finished rows.

    * A chain drafter (EAGLE-3) extends its own KV cache in ``observe`` (one entry per committed
      position, its chain entries from the last ``propose`` dropped) and runs K cached forwards in
      ``propose``.
    * A block drafter (DFlash) keeps the context features in ``observe`` and runs *one* forward over
      ``[x[n], mask x (block-1)]`` attending to them in ``propose``; K is then its block size - 1.

    Proposals must be a deterministic function of what was observed (greedy): the core compares
    speculative output with plain greedy decoding and exits 1 on any difference.
    """

    # HF hidden_states indices whose features ``observe`` needs, low -> high (from the export's
    # config); None = the algorithm's default for this target (``FeatureSpec.default_aux_layers``,
    # else the EAGLE-3 default).
    aux_layers: Optional[list[int]]

    def begin(self, prompts: Sequence[Sequence[int]]) -> None:
        """Start a batch: row r holds ``prompts[r]`` (forget any earlier batch)."""
        ...

    def observe(self, tokens: Sequence[Sequence[int]], features: Sequence[torch.Tensor]) -> None:
        """Row r committed ``tokens[r]`` = x[n+1..n+c] (c >= 1), with ``features[r]`` [c, F] =
        f[n..n+c-1] (feature i is the target's state at the token before ``tokens[r][i]``). Every
        row of the batch gets an entry."""
        ...

    def propose(self, k: int) -> list[list[int]]:
        """Exactly ``k`` draft tokens (target vocabulary ids) per row, continuing x[0..n]."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (ascending indices into the current batch), renumbered 0.."""
        ...

    # Optional: ``teacher_forced(tokens [T] int64, features [T, F], k) -> int64 [k, T]``: the
    # drafts the chain would propose at every position of a *known* greedy sequence in one pass
    # (row j, column t = draft j+1 after x[0..t+1] with features f[0..t]); enables ``--fast``.
