"""Options of the ``vllm`` target backend: the TOML table ``[inference.vllm]``.

Nothing here imports vLLM or torch: the options are plain data, checked on any machine.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import attrs

from specforge_core.config.fields import RangeError, in_range, option, positive

log = logging.getLogger(__name__)

# LLM(...) keywords the backend sets itself; dropped (with a warning) from extra_args.
PROTECTED = frozenset({
    "model", "tokenizer", "dtype", "trust_remote_code", "max_model_len", "tensor_parallel_size",
    "enforce_eager", "enable_prefix_caching", "speculative_config", "kv_transfer_config",
    "worker_extension_cls", "gpu_memory_utilization", "pipeline_parallel_size",
})


def _is_dict(_inst, attribute, value):
    if not isinstance(value, dict):
        raise RangeError(f"{value!r} is not allowed; allowed: a table (dict)", attribute.name)


@attrs.define
class VLLMBackendOptions:
    python: str = option(
        "",
        "Python interpreter of the environment vLLM is installed in (vLLM pins its own torch and "
        "transformers, so it usually lives in a venv of its own); empty = $SPECFORGE_VLLM_PYTHON, "
        "then this interpreter if it imports vllm, then a venv found by the plugin's discovery",
        path="path-or-command",
    )
    tensor_parallel_size: int = option(
        1, "Tensor-parallel size of one engine; must equal inference.gpus_per_engine", validator=positive
    )
    max_model_len: Optional[int] = option(
        None,
        "vLLM's max_model_len; unset = dataset.max_seq_length + 1 (one sampled token follows each "
        "prompt), capped at the target's max_position_embeddings",
        validator=positive,
    )
    gpu_memory_utilization: float = option(
        0.8, "GPU builds: fraction of GPU memory vLLM takes for weights + KV cache",
        validator=in_range(0, 1, lo_open=True),
    )
    cpu_kvcache_space_gib: float = option(
        1.0, "CPU builds: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); the hidden states captured per "
        "token live in it too until copied out", validator=in_range(0, None, lo_open=True),
    )
    enforce_eager: bool = option(True, "No CUDA graphs / torch.compile (prefill-only work gains nothing from them)")
    argmax_chunk_size: int = option(
        2048, "Tokens per compute_logits call for the full-vocab argmax", validator=positive
    )
    workdir: str = option(
        "", "Directory for the per-sample feature files handed from vLLM to the backend; empty = a "
        "fresh directory under /dev/shm (memory) where it exists, else the system temp dir", path=True,
    )
    start_timeout: int = option(900, "Seconds to wait for vLLM to start before failing", validator=positive)
    request_timeout: int = option(3600, "Seconds one batch may take before the backend gives up", validator=positive)
    log_level: str = option("WARNING", "vLLM's log level (VLLM_LOGGING_LEVEL)",
                            choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_file: str = option(
        "", "Where vLLM's output goes; empty = runner.log in the workdir (its tail is quoted in errors)",
        path=True,
    )
    env: dict = option(factory=dict, help="Extra environment variables for the vLLM process", validator=_is_dict)
    extra_args: dict = option(
        factory=dict,
        help="Any other vllm.LLM keyword, passed as is (e.g. extra_args.max_num_batched_tokens = 16384); "
        "keys the backend manages are dropped with a warning",
        validator=_is_dict,
    )

    def validate_with(self, config) -> None:
        """Called by the config loader: cross-section checks, when this backend is selected."""
        if config.inference.backend != "vllm":
            return
        if self.tensor_parallel_size != config.inference.gpus_per_engine:
            raise ValueError(
                f"inference.vllm.tensor_parallel_size = {self.tensor_parallel_size} must equal "
                f"inference.gpus_per_engine = {config.inference.gpus_per_engine} (one engine = one TP group); "
                "change one of them"
            )
        if self.max_model_len is not None and self.max_model_len <= config.dataset.max_seq_length:
            raise ValueError(
                f"inference.vllm.max_model_len = {self.max_model_len} must exceed dataset.max_seq_length = "
                f"{config.dataset.max_seq_length} (vLLM samples one token after each prompt)"
            )


    def plan_notes(self, config, plan: dict):
        """``specforge plan`` / ``config validate``: the engine's shape and its memory budget.

        Per token, vLLM's cache holds the target's KV plus the captured states ((n_aux + 1) x H in
        the inference dtype: the aux layers and the last layer's output) until they are copied out.
        """
        from specforge_core.components import PlanNotes

        gib = 1024**3
        T, B = config.dataset.max_seq_length, config.inference.batch_size
        mml = self.max_model_len or T + 1
        lines = [f"vllm: one engine = TP {self.tensor_parallel_size} on one node, max_model_len {mml}, "
                 "prefix caching off (every prompt token is recomputed and captured)"]
        problems: list[tuple[str, str, str]] = []
        if "target" not in plan:
            return PlanNotes(lines=lines, problems=problems)
        H = int(plan["target"]["hidden_size"])
        dtype_b = {"fp32": 4}.get(config.inference.dtype, 2)
        per_token = plan["kv_per_token"] + (plan["n_aux"] + 1) * H * dtype_b
        batch = per_token * B * (T + 1)
        facts = {"tp": self.tensor_parallel_size, "max_model_len": mml, "cache_bytes_per_token": per_token,
                 "cache_bytes_per_batch": batch}
        lines.append(f"vllm cache: {per_token / 1024:.1f} KiB/token (KV + captured states) -> "
                     f"{batch / gib:.2f} GiB for a batch of {B} x {T} tokens")
        gpu = config.run.gpu_memory_gib * gib
        key = "inference.vllm.gpu_memory_utilization"
        if gpu:
            budget, weights = self.gpu_memory_utilization * gpu, plan["target_weights_per_gpu"]
            if weights > budget:
                problems.append(("error", key, f"the target's weights need {weights / gib:.1f} GiB per GPU at TP "
                                 f"{plan['tp']} but {self.gpu_memory_utilization:g} x {config.run.gpu_memory_gib:g} "
                                 f"GiB = {budget / gib:.1f} GiB; raise TP or gpu_memory_utilization"))
            elif budget - weights < per_token * (T + 1):
                problems.append(("error", key, f"after {weights / gib:.1f} GiB of weights per GPU, "
                                 f"{(budget - weights) / gib:.2f} GiB is left for vLLM's cache but one sample of "
                                 f"{T} tokens needs {per_token * (T + 1) / gib:.2f} GiB"))
            elif budget - weights < batch:
                problems.append(("warning", key, f"vLLM's cache ({(budget - weights) / gib:.2f} GiB per GPU) holds "
                                 f"fewer than inference.batch_size = {B} full-length samples: batches run in parts"))
        else:  # CPU build (or hardware not stated): the KV space is an explicit number of GiB
            if config.inference.dtype == "auto":  # fp32 on CPU: twice the bf16 figures above
                per_token = 2 * per_token
            space, key = self.cpu_kvcache_space_gib * gib, "inference.vllm.cpu_kvcache_space_gib"
            if space < per_token * (T + 1):
                problems.append(("error", key, f"{self.cpu_kvcache_space_gib:g} GiB cannot hold one sample of {T} "
                                 f"tokens ({per_token * (T + 1) / gib:.2f} GiB on a CPU build)"))
        return PlanNotes(facts=facts, lines=lines, problems=problems)


def split_extra_args(extra_args: dict) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in extra_args.items():
        if key in PROTECTED:
            log.warning("inference.vllm.extra_args.%s is managed by the vllm backend; ignoring it", key)
            continue
        kept[key] = value
    return kept
