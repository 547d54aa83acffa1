"""Sizing arithmetic for the Mooncake pool (documented in docs/mooncake.md)."""

from __future__ import annotations

import attrs

MiB = 1 << 20
ALIGN = 64  # every tensor in a packed sample starts on a 64-byte boundary
HEADER_MAX = 4096  # packed-sample header (names, dtypes, shapes) stays far below this
N_TENSORS = 5  # input_ids, loss_mask, aux_hidden, final_hidden, target_argmax
SEGMENT_HEADROOM = 1.25  # allocator fragmentation + samples in flight past the backpressure check
MIN_LOCAL_BUFFER = 16 * MiB


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@attrs.define(frozen=True)
class MooncakeSizes:
    sample_bytes: int  # staging/receive buffer per sample (0 = grow on demand)
    global_segment_size: int  # bytes each connected process contributes
    local_buffer_size: int


def bytes_per_token(hidden_size: int, n_aux: int, dtype_bytes: int) -> int:
    # aux [T, n_aux*H] + final [T, H] in the hidden dtype, input_ids and target_argmax int64,
    # loss_mask uint8
    return (n_aux + 1) * hidden_size * dtype_bytes + 8 + 8 + 1


def compute_sizes(
    hidden_size: int, n_aux: int, max_seq_length: int, max_pool_bytes: int, dtype_bytes: int = 2
) -> MooncakeSizes:
    """Sizes from the model and the backpressure limit.

    sample_bytes = round_up(HEADER_MAX + T * bytes_per_token + N_TENSORS * ALIGN, 1 MiB)
    global_segment_size = round_up(SEGMENT_HEADROOM * (max_pool_bytes + 2 * sample_bytes), 1 MiB)
    local_buffer_size = max(16 MiB, sample_bytes)
    With hidden_size == 0 (model unknown) sample_bytes is 0: buffers grow to the largest sample.
    """
    for name, v in (("n_aux", n_aux), ("max_seq_length", max_seq_length), ("dtype_bytes", dtype_bytes)):
        if v <= 0:
            raise ValueError(f"compute_sizes: {name} must be > 0, got {v}")
    if hidden_size < 0 or max_pool_bytes <= 0:
        raise ValueError(f"compute_sizes: bad hidden_size={hidden_size} / max_pool_bytes={max_pool_bytes}")
    sample = 0
    if hidden_size:
        sample = round_up(
            HEADER_MAX + max_seq_length * bytes_per_token(hidden_size, n_aux, dtype_bytes) + N_TENSORS * ALIGN,
            MiB,
        )
    segment = round_up(int(SEGMENT_HEADROOM * (max_pool_bytes + 2 * sample)), MiB)
    return MooncakeSizes(sample, segment, max(MIN_LOCAL_BUFFER, sample))
