"""Storage codecs of the ``disk`` feature cache: ``bf16`` and ``fp8`` (float8_e4m3fn, one fp32 scale
per row).

A codec turns a sample's feature tensors into the tensors a shard stores and back. Integer tensors
(ids, masks, argmax) are stored as they are in both formats; floating tensors (hidden states):

- ``bf16``: cast to bfloat16 (lossless when the target ran in bf16, the GPU default).
- ``fp8``:  each row (one token of one tensor) scaled so its largest magnitude maps to e4m3's largest
  finite value (448), rounded to float8_e4m3fn; the fp32 scale is stored as ``<name>.scale`` [rows, 1].
  Round-to-nearest with 3 mantissa bits: every element is within ``ROW_RELATIVE_BOUND * |x|`` of the
  original, or ``SUBNORMAL_ABS_BOUND * scale`` for values in e4m3's subnormal range (|x|/scale < 2^-6).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

FORMATS = ("bf16", "fp8")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
ROW_RELATIVE_BOUND = 2.0**-4  # half a unit in the last place of a 3-bit mantissa
SUBNORMAL_ABS_BOUND = 2.0**-10  # half the subnormal spacing (2^-9), in units of the row's scale
SCALE_SUFFIX = ".scale"


def encode_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: float8_e4m3fn [..., D] and fp32 [..., 1] with ``q * scale ~= x`` row by row."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # an all-zero row keeps scale 1 (any scale decodes it exactly); avoids 0/0
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def decode_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def bytes_per_row(width: int, fmt: str) -> int:
    """Stored bytes of one row of ``width`` floating values."""
    return width + 4 if fmt == "fp8" else 2 * width


def encode(tensors: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if fmt not in FORMATS:
        raise ValueError(f"feature cache format {fmt!r}: allowed are {', '.join(FORMATS)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            out[name] = t.contiguous()
        elif fmt == "bf16":
            out[name] = t.to(torch.bfloat16).contiguous()
        else:
            out[name], out[name + SCALE_SUFFIX] = encode_rows(t)
    return out


def decode(stored: Mapping[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The feature tensors back, floating ones in ``dtype`` (the dtype the target produced)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if fmt == "fp8" and t.dtype == torch.float8_e4m3fn:
            out[name] = decode_rows(t, stored[name + SCALE_SUFFIX], dtype)
        elif t.is_floating_point():
            out[name] = t.to(dtype)
        else:
            out[name] = t
    return out
