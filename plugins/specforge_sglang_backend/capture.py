"""The capture protocol between SGLang's model process and the backend (pure torch, no sglang).

SGLang hands hidden states back per prompt token through ``return_hidden_states``. With EAGLE-3
aux capture on, its ``LogitsProcessor`` stores ``torch.cat(aux_hidden_states, -1)`` for every
token (CaptureHiddenMode.FULL). The specforge model class (``sgl_models/``) appends two more
pieces to that list before SGLang concatenates it, so each returned row is::

    [ aux_0 (H) | ... | aux_{n-1} (H) | final hidden, post-norm (H) | argmax digits (3) ]

The full-vocab argmax travels as three base-256 digits: integers 0..255 are exact in bf16, fp16
and fp32, and survive SGLang's ``.tolist()`` round trip, while a raw id above 256 would not be
exact in bf16.

Layer convention: specforge aux id ``i`` = HF ``hidden_states[i]`` = the residual stream entering
decoder layer ``i``. SGLang's ``set_eagle3_layers_to_capture(layer_ids)`` stores
``layers_to_capture = [v + 1 for v in layer_ids]`` and captures ``hidden_states + residual`` just
before running layer ``v + 1``; so we pass ``layer_ids = [i - 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

DIGITS = 3
BASE = 256
MAX_VOCAB = BASE**DIGITS  # 16.7M ids


def sglang_layer_ids(aux_layers: Sequence[int]) -> list[int]:
    """specforge aux ids (HF ``hidden_states`` indices) -> ``set_eagle3_layers_to_capture`` ids."""
    bad = [i for i in aux_layers if i < 1]
    if bad:
        # SGLang captures `hidden_states + residual`, and the residual is unset before layer 0.
        raise ValueError(f"aux layer ids {bad} cannot be captured by SGLang; allowed: >= 1")
    return [int(i) - 1 for i in aux_layers]


def row_width(n_aux: int, hidden_size: int) -> int:
    return n_aux * hidden_size + hidden_size + DIGITS


# --------------------------------------------------------------------------- model-process side
def encode_argmax(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int [N] -> [N, 3] of ``dtype`` holding base-256 digits, low digit first."""
    ids = ids.to(torch.int64)
    digits = [(ids // BASE**k) % BASE for k in range(DIGITS)]
    return torch.stack(digits, dim=-1).to(dtype)


def chunked_argmax(hidden: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, chunk: int) -> torch.Tensor:
    """Full-vocab argmax per row, never holding more than ``chunk`` rows of logits."""
    out = [logits_fn(h)[:, :vocab_size].argmax(dim=-1) for h in hidden.split(chunk)]
    return torch.cat(out) if out else hidden.new_zeros((0,), dtype=torch.int64)


def pack_aux(aux: Sequence[torch.Tensor], final: torch.Tensor, argmax: torch.Tensor) -> list[torch.Tensor]:
    """The list the stock LogitsProcessor concatenates into each returned row."""
    return [*aux, final, encode_argmax(argmax, final.dtype)]


def install_capture(model: Any, aux_layers: Sequence[int], vocab_size: int, chunk: int) -> None:
    """Turn on EAGLE-3 aux capture in an SGLang model and make its logits processor also return the
    final hidden state and the full-vocab argmax (called from the specforge model class).

    Only the instance's ``logits_processor.forward`` is replaced, so every other attribute SGLang
    reads from the processor stays as it was.
    """
    if not hasattr(model, "set_eagle3_layers_to_capture") or not hasattr(model, "logits_processor"):
        raise RuntimeError(
            f"{type(model).__name__}: this SGLang model class has no EAGLE-3 aux capture "
            "(set_eagle3_layers_to_capture / logits_processor); the sglang backend cannot serve it. "
            "Use inference.backend = 'hf' for this target."
        )
    model.set_eagle3_layers_to_capture(sglang_layer_ids(aux_layers))
    lp = model.logits_processor
    inner_forward = lp.forward

    def forward(input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states=None, *args, **kwargs):
        mode = getattr(logits_metadata, "capture_hidden_mode", None)
        if aux_hidden_states is not None and mode is not None and mode.is_full():
            meta = _as_logits_metadata(logits_metadata)
            argmax = chunked_argmax(hidden_states, lambda h: lp._get_logits(h, lm_head, meta), vocab_size, chunk)
            aux_hidden_states = pack_aux(aux_hidden_states, hidden_states, argmax)
        return inner_forward(input_ids, hidden_states, lm_head, logits_metadata, aux_hidden_states, *args, **kwargs)

    lp.forward = forward


def _as_logits_metadata(meta: Any) -> Any:
    # The processor's forward accepts a ForwardBatch and converts it itself; _get_logits does not.
    if type(meta).__name__ == "ForwardBatch":
        from sglang.srt.layers.logits_processor import LogitsMetadata

        return LogitsMetadata.from_forward_batch(meta)
    return meta


# ---------------------------------------------------------------------------------- backend side
def decode_argmax(digits: torch.Tensor) -> torch.Tensor:
    d = digits.to(torch.float64)
    if not torch.equal(d, d.round()) or bool((d < 0).any()) or bool((d >= BASE).any()):
        raise ValueError(
            "the argmax digits in SGLang's hidden-state rows are not integers in [0, 256): the rows "
            "were not produced by the specforge capture model class (is SGLANG_EXTERNAL_MODEL_PACKAGE "
            "overridden?)"
        )
    d = d.to(torch.int64)
    return sum(d[:, k] * BASE**k for k in range(DIGITS))


def split_rows(rows: torch.Tensor, n_aux: int, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, row_width] -> (aux [T, n_aux*H], final [T, H], argmax int64 [T])."""
    want = row_width(n_aux, hidden_size)
    if rows.dim() != 2 or rows.shape[1] != want:
        raise ValueError(
            f"SGLang returned hidden-state rows of shape {tuple(rows.shape)}; expected [T, {want}] "
            f"({n_aux} aux x {hidden_size} + final {hidden_size} + {DIGITS} argmax digits). The specforge "
            "capture model class was not used: check that SGLANG_EXTERNAL_MODEL_PACKAGE is not set to "
            "another package and that the target architecture is supported (see docs/sglang.md)"
        )
    a = n_aux * hidden_size
    return rows[:, :a], rows[:, a : a + hidden_size], decode_argmax(rows[:, a + hidden_size :])
