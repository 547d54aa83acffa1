"""Workarounds for defects of vLLM's CPU build that change *what* it computes. Runs inside the vLLM venv.

Self-contained (torch + vLLM only) like the runners that import it. Each workaround first checks
that the defect is there and patches only then, so it switches itself off once vLLM is fixed; the
runner records what was applied in its result.

**Speculative sampling (T > 0) on CPU.** The rejection sampler expands per-request temperature,
top-k and top-p to one value per draft token with ``expand_batch_to_tokens``
(``vllm/v1/sample/rejection_sampler.py``), which allocates ``x.new_empty(num_tokens)`` and fills it
with the ``expand_kernel`` Triton kernel. Without Triton, vLLM's CPU platform replaces that kernel
with ``_expand_kernel_impl`` (``vllm/utils/cpu_triton_utils.py``), which hands the C++ kernel
``_ensure_int64(output)``: for a float32 (temperature, top-p) or int32 (top-k) buffer that is a new
int64 copy, so the kernel writes the copy and the caller's buffer keeps its uninitialised memory
(the input is truncated to int64 as well: 0.7 -> 0). ``apply_sampling_constraints`` then divides
the target logits by that garbage (~1e-43 here: inf/NaN logits), and the rejection kernel accepts
almost no draft. Reported upstream as vllm-project/vllm#55005 (fix proposed in #55006); present in
vLLM 0.32. The workaround replaces ``expand_batch_to_tokens`` with the same expansion in plain torch.
"""

from __future__ import annotations

import os


def _expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0, replace_to: int = 0):
    """What the Triton ``expand_kernel`` computes: x[i] repeated for request i's tokens, with
    ``replace_from`` values replaced by ``replace_to`` (greedy rows' temperature 0 -> 1)."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = x.new_zeros(num_tokens)
    rep = x.repeat_interleave(counts)
    out[: rep.numel()] = rep
    return out


def expand_is_correct() -> bool:
    """Whether vLLM's ``expand_batch_to_tokens`` expands a float32 and an int32 tensor correctly
    (as the rejection sampler calls it for temperature and top-k)."""
    import torch
    from vllm.v1.sample import rejection_sampler as rs

    cu = torch.tensor([2, 5], dtype=torch.int32)
    cases = [(torch.tensor([0.7, 0.0]), torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0])),
             (torch.tensor([5, 9], dtype=torch.int32), torch.tensor([5, 5, 9, 9, 9], dtype=torch.int32))]
    for x, want in cases:
        try:
            got = rs.expand_batch_to_tokens(x, cu, 5, replace_from=0, replace_to=1)
        except Exception:  # a missing kernel op is the same defect, louder
            return False
        if got.dtype != want.dtype or not torch.equal(got, want):
            return False
    return True


def apply() -> list[str]:
    """Check for each known defect and patch it in this process; one line per workaround applied.
    Call it after the engine is built (vLLM registers its CPU kernel overrides at worker start)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
        return ["not applied: vLLM's engine core runs in another process (VLLM_ENABLE_V1_MULTIPROCESSING != 0)"]
    applied = []
    if not expand_is_correct():
        from vllm.v1.sample import rejection_sampler as rs

        rs.expand_batch_to_tokens = _expand_batch_to_tokens
        applied.append("expand_batch_to_tokens: vLLM CPU's expand_kernel override leaves its output "
                       "uninitialised (vllm-project/vllm#55005); replaced by a torch expansion")
    return applied
