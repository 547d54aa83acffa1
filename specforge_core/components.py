"""The contracts a plugin implements, one per component kind, and every optional member.

A plugin registers a *factory* for each component under a name (see ``hookspecs``). The core calls
the factory with the structured config section of that component (an attrs instance of the class the
plugin registered, or ``None``) plus the arguments listed in each protocol below.

These are ``typing.Protocol`` classes: plugins need not inherit from them, only match them. Each
contract lists **every** member the core reads from a component of its kind, in one place:

- required members: plain protocol members (attributes and methods);
- optional members (capabilities): methods decorated ``@optional`` and attributes declared
  ``= optional_attr(default)``. The core reads them only through ``capability(obj,
  "Contract.member")``, which accepts declared names only (a typo in the core fails at once) and
  returns the declared default when a component lacks the member.

The registry checks each component against its contract when it builds it (and each options class
and factory when a plugin registers them): a missing required member, or a public member that is not
declared but is close to a declared one the component lacks (``weighted_group`` for
``weighted_groups``), is one error line naming the plugin, the component and the member.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ContextManager, Optional, Protocol

import attrs
import torch

# The table of component kinds lives in ``hookspecs`` (torch-free: light processes import it);
# re-exported here because each row names its contract in this module.
from specforge_core.hookspecs import KINDS, Kind  # noqa: F401
from specforge_core.training.batch import Batch
from specforge_core.types import Sample, TargetFeatures, TargetInfo


# ============================================================================ declaring members
class optional_attr:  # noqa: N801 (used like a field declaration)
    """Declares an optional attribute (a capability flag or value) in a contract's body:
    ``supplies_features: bool = optional_attr(False)``. ``default`` is what ``capability``
    returns for a component without it."""

    def __init__(self, default: Any = None) -> None:
        self.default = default

    def __repr__(self) -> str:
        return f"optional_attr({self.default!r})"


def optional(method: Callable) -> Callable:
    """Declares an optional method in a contract's body (``capability`` returns None without it)."""
    method.__specforge_optional__ = True  # type: ignore[attr-defined]
    return method


class _ContractMeta(type(Protocol)):  # type: ignore[misc]
    """``isinstance(obj, Contract)`` checks the *required* members only (a runtime-checkable
    protocol would also demand every optional one)."""

    def __instancecheck__(cls, instance: Any) -> bool:
        if cls.__dict__.get("_is_protocol"):
            return not _missing(instance, cls)
        return super().__instancecheck__(instance)


@attrs.frozen
class Member:
    name: str
    required: bool
    method: bool
    default: Any = None


def members(contract: str | type) -> dict[str, Member]:
    """Every member ``contract`` declares (a name in ``CONTRACTS`` or the class), by name."""
    return dict(_members(CONTRACTS[contract] if isinstance(contract, str) else contract))


@functools.cache  # contracts are fixed once imported; capability() runs on hot paths (staging)
def _members(cls: type) -> dict[str, Member]:
    out: dict[str, Member] = {}
    for base in reversed(cls.__mro__):
        if not base.__dict__.get("_is_protocol") or base is Protocol:
            continue
        names = [*base.__dict__.get("__annotations__", {}), *base.__dict__]
        for name in names:
            if name.startswith("_") and name != "__call__":
                continue
            value = base.__dict__.get(name, None)
            if isinstance(value, optional_attr):
                out[name] = Member(name, required=False, method=False, default=value.default)
            elif callable(value):
                out[name] = Member(name, required=not getattr(value, "__specforge_optional__", False), method=True)
            elif name not in out:
                out[name] = Member(name, required=True, method=False)
    return out


class UndeclaredMember(LookupError):
    """The core asked for a member its contract does not declare (a bug in the caller)."""


def _is_stub(value: Any) -> bool:
    """The contract's own declaration (a class that subclasses the protocol inherits it)."""
    return isinstance(value, optional_attr) or getattr(value, "__specforge_optional__", False)


def capability(obj: Any, member: str) -> Any:
    """``obj``'s member ``"Contract.name"`` (bound method or value), or its declared default
    (None for a method) when ``obj`` lacks it. Only declared members are accepted."""
    contract, _, name = member.partition(".")
    if contract not in CONTRACTS:
        raise UndeclaredMember(f"no contract {contract!r}; contracts: {', '.join(CONTRACTS)}")
    declared = _members(CONTRACTS[contract])
    if name not in declared:
        hint = difflib.get_close_matches(name, declared, n=1)
        raise UndeclaredMember(f"{contract} declares no member {name!r}"
                               + (f"; did you mean {hint[0]!r}?" if hint else ""))
    value = getattr(obj, name, _ABSENT)
    return declared[name].default if value is _ABSENT or _is_stub(value) else value


def has_capability(obj: Any, member: str) -> bool:
    """Whether ``obj`` implements the declared member ``"Contract.name"`` itself."""
    capability(obj, member)  # only declared names
    value = getattr(obj, member.partition(".")[2], _ABSENT)
    return value is not _ABSENT and not _is_stub(value)


_ABSENT = object()
# Modules whose classes are not the plugin's own (their public names are not checked for spelling).
_FOREIGN = ("builtins", "torch", "typing", "abc", "collections", "attr", "attrs", "functools", "enum")


def own_public_names(obj: Any, methods_only: bool = False) -> set[str]:
    """Public names a plugin defined on ``obj`` (its classes' and its instance's), not inherited
    from Python, torch or the contracts."""
    classes = obj.__mro__ if isinstance(obj, type) else type(obj).__mro__
    names: set[str] = set()
    for cls in classes:
        if cls is object or (cls.__module__ or "").split(".")[0] in _FOREIGN or cls.__dict__.get("_is_protocol"):
            continue
        fields = {a.name for a in attrs.fields(cls)} if attrs.has(cls) else set()
        names |= {n for n, v in vars(cls).items() if not n.startswith("_") and n not in fields
                  and (callable(v) or isinstance(v, (staticmethod, classmethod, property)) or not methods_only)}
    if not isinstance(obj, type):  # an instance's own attributes (a function factory's too)
        names |= {n for n in getattr(obj, "__dict__", {}) if not n.startswith("_")}
    return names


def _missing(obj: Any, contract: str | type) -> list[str]:
    return [m.name for m in members(contract).values()
            if m.required and (not callable(obj) if m.name == "__call__" else not hasattr(obj, m.name))]


def conformance_problems(obj: Any, contract: str, methods_only: bool = False) -> list[str]:
    """What is wrong with ``obj`` as a ``contract``: each entry one phrase naming the member."""
    if contract == "LRLambda":
        return [] if callable(obj) else [f"is {type(obj).__name__}, not a callable step -> LR multiplier (LRLambda)"]
    declared = members(contract)
    own = own_public_names(obj, methods_only=methods_only)
    problems = []
    lacking = [n for n in declared if n != "__call__" and not hasattr(obj, n)]
    for name in _missing(obj, contract):
        hint = difflib.get_close_matches(name, sorted(own - set(declared)), n=1, cutoff=0.8)
        problems.append(f"lacks {name!r}, which {contract} requires"
                        + (f" (it has {hint[0]!r}: misspelled?)" if hint else ""))
    for name in sorted(own - set(declared)):
        hint = difflib.get_close_matches(name, lacking, n=1, cutoff=0.8)
        if hint and not any(p.startswith(f"lacks {hint[0]!r}") for p in problems):
            problems.append(f"has {name!r}, which {contract} does not declare; did you mean {hint[0]!r}?")
    for name, m in declared.items():
        value = getattr(obj, name, None) if name != "__call__" else obj
        if m.method and value is not None and not _is_stub(value) and not callable(value):
            problems.append(f"{name!r} must be a method ({contract}), got {type(value).__name__}")
    return problems


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
    # The first token index the objective predicts: a sample is trained only if it has a loss token
    # at index >= this (EAGLE-3: 2, its step 0 at position t predicts t+2; DFlash: 1).
    min_loss_index: int = 1


@attrs.define
class TargetHead:
    """The frozen target weights a trainer hands an objective (and its loss), on the device.

    ``rows`` [Vd, H] are the target lm_head rows of the draft vocabulary in draft order (compute
    dtype), ``t2d`` bool [V] marks target ids in the draft vocab, ``draft_ids`` int64 [Vd] is the
    target id of each draft id. ``full()`` loads the *whole* target lm_head [V, H] on first call
    (cached) for losses that need the target's full-vocab distribution (``Loss.needs_full_vocab``).
    ``logit_softcap``: the target's ``final_logit_softcapping`` (Gemma 2), None = none; a loss that
    builds target logits from ``final_hidden @ rows.T`` passes them through ``logits()``.
    """

    rows: torch.Tensor
    t2d: torch.Tensor
    draft_ids: torch.Tensor
    full_loader: Optional[Callable[[], torch.Tensor]] = None
    _full: Optional[torch.Tensor] = None
    logit_softcap: Optional[float] = None

    def full(self) -> torch.Tensor:
        if self._full is None:
            if self.full_loader is None:
                raise RuntimeError("the full target lm_head was not made available to this objective")
            self._full = self.full_loader()
        return self._full

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The target's logits from ``final_hidden @ head.T`` (``raw``): softcapped as the target's
        own forward does (``cap * tanh(raw / cap)``), else unchanged."""
        return softcap_logits(raw, self.logit_softcap)


def softcap_logits(raw: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``cap * tanh(raw / cap)`` (Gemma 2's ``final_logit_softcapping``); ``raw`` when ``cap`` is None/0."""
    return raw if not cap else torch.tanh(raw / cap) * cap


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
    # what the activation memory scales with besides the micro-batch, for the plan's memory line
    # (e.g. "ttt 7": EAGLE-3 keeps every TTT step's activations)
    memory_note: str = ""
    # config problems: (level "error"|"warning", dotted config key, message)
    problems: list[tuple[str, str, str]] = attrs.Factory(list)


class DraftAlgorithm(Protocol, metaclass=_ContractMeta):
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

    def count_targets(self, batch: Batch, head: TargetHead) -> torch.Tensor:
        """float64 [G] on the batch's device: valid targets of each prediction group in this
        micro-batch (``training.batch.Batch``), from its masks only (cheap, no forward). The
        trainer sums them over the step's micro-batches and ranks into ``denominators``."""
        ...

    def objective(self, draft: torch.nn.Module, batch: Batch, ctx: ObjectiveContext
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

    @optional
    def display_metrics(self) -> dict[str, list[str]]:
        """Which of ``summarize``'s metrics a run shows: label -> metric names printed after it on
        the console's metric line, in order (``{"acc": ["acc_0", "acc_1"], "tau": ["accept_len"]}``);
        the first name is the progress bar's headline. Without it the line shows loss, throughput,
        LR and grad norm only (W&B logs every metric either way)."""

    # ---- optional, for ``specforge eval`` (see "evaluation" at the end of this module)
    export_architectures: tuple[str, ...] = optional_attr(())
    """config.json ``architectures`` its export writes: how ``specforge eval --draft DIR`` finds
    the algorithm of an export without a run config."""

    @optional
    def proposer(self, export_dir: Any, target: EvalTarget, device: torch.device) -> Proposer:
        """The draft side of greedy speculation for the export in ``export_dir`` (``Proposer``),
        reading frozen target tensors through ``target``. Without it the algorithm cannot be
        evaluated in process."""
        ...


# ---------------------------------------------------------------------------------------- target
class TargetBackend(Protocol, metaclass=_ContractMeta):
    """Runs the target LLM and captures EAGLE-3 features.

    Factory: ``factory(options, config: SpecforgeConfig, device: str | None) -> TargetBackend``.
    """

    info: TargetInfo

    def generate(self, samples: Sequence[Sample]) -> list[TargetFeatures]: ...

    def close(self) -> None: ...

    @optional
    def generate_text(self, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[GeneratedText]:
        """Text generation by the same target (``specforge data regenerate``), batched by the
        backend: one ``GeneratedText`` per prompt, in order. Prompts are token ids (the caller
        applies the chat template the training uses). A backend without it cannot regenerate data."""
        ...


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
class TransferStore(Protocol, metaclass=_ContractMeta):
    """A key -> named-tensors store between inference producers and trainer consumers."""

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Store ``tensors`` under ``key``; return the exact number of payload bytes stored."""
        ...

    def get(self, key: str, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]: ...

    @optional
    def get_into(self, key: str, alloc: Callable[[int], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fast path of ``get`` (training/staging.py): read the sample into ``alloc(nbytes)``, a
        uint8 buffer the caller owns (pinned, reused), and return views of it."""
        ...

    def delete(self, keys: Sequence[str]) -> None: ...

    def count(self) -> int:
        """Keys this run currently holds (a run must end at zero)."""
        ...

    def close(self) -> None: ...


class TransferStoreProvider(Protocol, metaclass=_ContractMeta):
    """What a transfer-store plugin registers as its factory result.

    Factory: ``factory(options) -> TransferStoreProvider``. The pipeline calls ``start`` once on the
    head (it may launch services, e.g. a Mooncake master), ships the picklable handle to every
    process, which calls ``connect``; ``stop`` runs at the end of the run, even after errors.
    """

    def start(self, run_id: str) -> Any: ...

    def connect(self, handle: Any) -> TransferStore: ...

    def stop(self, handle: Any) -> None: ...

    @optional
    def configure(self, hidden_size: int, n_aux: int, max_seq_length: int, max_pool_bytes: int,
                  dtype_bytes: int = 2) -> Any:
        """Called by the Ray pipeline before ``start``: size buffers from the model (hidden size,
        aux layers captured, longest sample, ``transfer.max_pool_bytes``, bytes per hidden value).
        The return value is the provider's own (ignored by the core)."""
        ...

    # ---- a feature cache (``specforge data features``; data/features.py)
    supplies_features: bool = optional_attr(False)
    """True: the store serves the target's features from storage written beforehand, so the
    pipelines build no target backend. Such a provider has the members below."""
    dir: str = optional_attr(None)
    """Directory of the cache."""
    format: str = optional_attr(None)
    """Storage format of the hidden states (the provider's own name, recorded in the cache index)."""
    shard_samples: int = optional_attr(None)
    """Samples per shard file."""

    @optional
    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One sample's features -> the tensors stored in the cache (its storage codec)."""
        ...

    @optional
    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Inverse of ``encode``; hidden states in ``dtype``."""
        ...

    @optional
    def feature_source(self, config: Any) -> TargetBackend:
        """A ``TargetBackend`` that reads the cache for ``config`` (checked against its fingerprint)."""
        ...


# ------------------------------------------------------------------------------------------ loss
@attrs.define
class LossOutput:
    loss_sum: torch.Tensor  # scalar, differentiable: SUM over valid rows of the per-token loss
    correct: torch.Tensor  # scalar int: valid rows whose draft argmax == the target's draft-vocab argmax
    count: torch.Tensor  # scalar int: valid rows


class Loss(Protocol, metaclass=_ContractMeta):
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

    Optional members: ``needs_full_vocab``, ``weighted_groups`` (a fast path) and
    ``workspace_bytes`` (planning), below.
    """

    needs_full_vocab: bool = optional_attr(False)
    """True: ``prepare`` reads ``head.full()``, the whole [V, H] target lm_head."""

    def prepare(self, final_hidden: torch.Tensor, head: TargetHead) -> Any: ...

    def __call__(
        self,
        draft_hidden: torch.Tensor,
        draft_head: torch.Tensor,
        prepared: Any,
        target_rows: torch.Tensor,
        valid: torch.Tensor,
    ) -> LossOutput: ...

    @optional
    def weighted_groups(self, prepared: Any, valid: torch.Tensor, weights: torch.Tensor) -> WeightedGroups:
        """Fast path for algorithms that know every group's valid rows and weight before the
        forward (EAGLE-3: the step masks, and decay**k over the step's denominators): ``valid``
        bool [G, N], ``weights`` [G]; see ``WeightedGroups``. Same value and gradients as the
        per-group calls; a loss can then find all groups' rows with one host sync, cast the draft
        head once and accumulate its gradient in one buffer (forward-kl: ~6 ms of 76 and 2.3 GiB
        less per micro-step at an 8B-shaped draft, T = 2048, on an H200; docs/performance.md)."""
        ...

    @optional
    def workspace_bytes(self, tokens: int, draft_vocab: int) -> int:
        """Planning: transient device bytes per micro-batch of ``tokens`` tokens (chunk buffers,
        precomputed target distributions...). Absent: 0."""
        ...


class WeightedGroups(Protocol, metaclass=_ContractMeta):
    """What ``Loss.weighted_groups`` returns: add each group once, then ``finish``."""

    def add(self, g: int, draft_hidden: torch.Tensor, draft_head: torch.Tensor,
            target_rows: torch.Tensor) -> LossOutput:
        """Group ``g``'s draft rows; returns its ``LossOutput`` with detached sums."""
        ...

    def finish(self) -> torch.Tensor:
        """The differentiable ``sum_g weights[g] * loss_sum_g`` (backpropagated once)."""
        ...


# ----------------------------------------------------------------------------------- lr schedule
# Factory: ``factory(options, total_steps: int, warmup_steps: int) -> LRLambda``; the trainer wraps
# it in ``torch.optim.lr_scheduler.LambdaLR`` (multiplier of the base learning rate).
LRLambda = Callable[[int], float]


# ------------------------------------------------------------------------------------- strategy
class TrainingStrategy(Protocol, metaclass=_ContractMeta):
    """How the draft is placed, wrapped, synchronised and checkpointed.

    Factory: ``factory(options, config: SpecforgeConfig) -> TrainingStrategy``. The process group
    (if any) is already initialised by the caller (``torch.distributed``) when the factory runs; a
    factory that needs one even for a single rank sets ``factory.needs_process_group = True``
    (``ComponentFactory``).

    Gradients are SUMMED over ranks (not averaged): each rank's loss is already divided by the
    whole step's token count (``ObjectiveContext.denominators``).

    """

    rank: int
    world_size: int
    device: torch.device

    wraps_step: bool = optional_attr(False)
    """True: ``prepare`` receives a ``training.trainer.DraftStep`` (the draft plus its objective;
    ``forward`` runs one whole micro-step, state keys ``draft.*``) instead of the bare draft, for
    strategies that gather parameters and reduce gradients from forward hooks (FSDP2)."""

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


# ---------------------------------------------------------------------- options and factories
# ``specforge plan`` and ``config validate`` are arithmetic on the config: they never start a
# backend or a strategy. Components contribute through optional methods on their *options class*
# (the attrs config they registered, ``ComponentOptions``); the draft algorithm contributes
# ``DraftAlgorithm.plan``, a loss ``Loss.workspace_bytes``.
@attrs.define
class PlanNotes:
    facts: Any = None
    lines: list[str] = attrs.Factory(list)
    problems: list[tuple[str, str, str]] = attrs.Factory(list)  # (level, dotted key, message)


class ComponentOptions(Protocol, metaclass=_ContractMeta):
    """The attrs class a plugin registers as a component's ``config`` (its ``[section.<name>]``
    table). Its fields are the options; these methods are all optional."""

    @optional
    def validate_with(self, config: Any) -> None:
        """Cross-section check when the component is selected, run by the config loader (so by
        ``config validate`` and ``run`` alike): raise ``ValueError`` (or ``config.fields.RangeError``)
        with one line naming the keys; it becomes a config error on ``[section.<name>]``."""
        ...

    @optional
    def plan_notes(self, config: Any, plan: dict) -> PlanNotes:
        """Any component: extra facts for ``plan`` (stored as ``plan[<component name>]``), lines
        ``specforge plan`` prints, and config problems ``config validate`` reports. A target
        backend with it budgets its own GPU memory (the core then skips its weights check)."""
        ...

    @optional
    def engine_nodes(self) -> int:
        """Target backends: nodes one inference engine spans (absent: 1)."""
        ...

    @optional
    def train_state_split(self, num_gpus: int) -> tuple[int, bool]:
        """Training strategies: (ranks the fp32 params, grads and optimizer state are sharded over,
        whether that state lives in CPU memory). Absent: (1, False)."""
        ...


class ComponentFactory(Protocol, metaclass=_ContractMeta):
    """The callable a plugin registers: ``factory(options, *args)`` with the kind's arguments
    (each contract's docstring lists them)."""

    def __call__(self, options: Any, *args: Any, **kwargs: Any) -> Any: ...

    needs_process_group: bool = optional_attr(False)
    """Training strategies: True makes the caller initialise ``torch.distributed`` even for one
    rank (FSDP2)."""


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
class EvalTarget(Protocol, metaclass=_ContractMeta):
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


class Proposer(Protocol, metaclass=_ContractMeta):
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

    @optional
    def teacher_forced(self, tokens: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
        """``tokens`` int64 [T], ``features`` [T, F] -> int64 [k, T]: the drafts the chain would
        propose at every position of a *known* greedy sequence in one pass (row j, column t =
        draft j+1 after x[0..t+1] with features f[0..t]); enables ``specforge eval --fast``."""
        ...

    @optional
    def serving_flags(self, draft: str, steps: int, tree: Any) -> Optional[dict[str, Optional[str]]]:
        """The serving engines' command-line flags for this export at this setting (``steps`` drafts
        per cycle, or ``tree``: an ``evaluation.tree.TreeSpec`` with topk, depth, tokens), by engine
        name; None for an engine that cannot serve it (``specforge eval --advise`` prints them)."""
        ...

    @optional
    def propose_tree(self, topk: int, depth: int, tokens: int) -> list[tuple[list[int], list[int]]]:
        """A draft tree per row (``specforge eval --tree``): ``(tokens, parents)`` with node i+1's
        target token and its parent node (0 = x[n]; parents come before their children), at most
        ``depth`` levels and ``tokens - 1`` nodes (EAGLE-2/3: the dynamic top-``topk`` tree). The
        next ``observe`` drops the tree's entries as it drops a chain's."""
        ...


# ================================================================================== the table
# Contract name -> class: what ``capability`` and the registry's checks read. ``KINDS`` names each
# kind's contract; ``LRLambda`` is a plain callable (checked as one).
CONTRACTS: dict[str, type] = {
    cls.__name__: cls
    for cls in (DraftAlgorithm, TargetBackend, TransferStoreProvider, TransferStore, Loss, WeightedGroups,
                TrainingStrategy, ComponentOptions, ComponentFactory, EvalTarget, Proposer)
}
