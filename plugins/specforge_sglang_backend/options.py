"""Options of the ``sglang`` target backend (the TOML table ``[inference.sglang]``) and the pure
mapping from them to ``sgl.Engine(**kwargs)``.

Nothing here imports sglang: the mapping is plain data so it can be tested on any machine.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import attrs

from specforge_core.config.fields import RangeError, in_range, option, positive
from specforge_core.plugin_api import engine_dtype

log = logging.getLogger(__name__)

# inference.dtype -> SGLang's --dtype. 'auto' means bf16 on GPU, like the hf backend (SGLang's own
# 'auto' would follow config.json's torch_dtype, which may be fp32 and then differ from `hf`).

# Keys the plugin manages itself: dropped (with a warning naming each) when set in extra_args.
# Grouped by why they are protected; the names are SGLang ServerArgs fields.
PROTECTED_KEYS: dict[str, tuple[str, ...]] = {
    "topology (one engine per inference actor; set tp_size / nnodes / inference.gpus_per_engine)": (
        "tp_size", "pp_size", "dp_size", "base_gpu_id", "nnodes", "node_rank", "ep_size",
        "enable_dp_attention",
    ),
    "ports (picked free per engine)": ("port", "nccl_port"),
    "networking (set dist_init_addr / dist_timeout)": ("dist_init_addr", "dist_timeout"),
    "spec-training capture invariants": (
        # a radix-cache hit skips the prefix forward, so its hidden states would be missing
        "disable_radix_cache",
        # SGLang slices per-request hidden states by prompt length; chunks would misalign them
        "chunked_prefill_size",
        "enable_return_hidden_states",
        "return_hidden_states_mode",
        # prefill-only requests never decode, so decode graphs only cost memory and start-up time
        "disable_cuda_graph",
        "skip_tokenizer_init",
        "speculative_algorithm",
        "speculative_draft_model_path",
        "enable_aux_hidden_states",
    ),
    "derived from other sections": (
        "model_path", "tokenizer_path", "trust_remote_code", "mem_fraction_static", "dtype",
    ),
}
PROTECTED: frozenset[str] = frozenset(k for keys in PROTECTED_KEYS.values() for k in keys)


def _dict_or_none(_inst, attribute, value):
    if value is not None and not isinstance(value, dict):
        raise RangeError(f"{value!r} is not allowed; allowed: a table (dict) or unset", attribute.name)


def _is_dict(_inst, attribute, value):
    if not isinstance(value, dict):
        raise RangeError(f"{value!r} is not allowed; allowed: a table (dict) of sgl.Engine keywords", attribute.name)


def _pp_one(_inst, attribute, value):
    if value != 1:
        raise RangeError(
            f"{value!r} is not allowed; allowed: 1 (aux hidden states are captured on one pipeline "
            "stage; use tp_size to spread the target)",
            attribute.name,
        )


@attrs.define
class SglangOptions:
    tp_size: int = option(8, "Tensor-parallel size of one engine; must equal nnodes x inference.gpus_per_engine", validator=positive)
    pp_size: int = option(1, "Pipeline-parallel size; must be 1", validator=_pp_one)
    nnodes: int = option(1, "Nodes one engine spans (multi-node TP)", validator=positive)
    mem_fraction_static: float = option(
        0.8, "Fraction of GPU memory SGLang takes for weights + KV cache", validator=in_range(0, 1, lo_open=True)
    )
    context_length: Optional[int] = option(None, "Max context length; unset = the model's", validator=positive)
    attention_backend: str = option("flashinfer", "SGLang attention backend ('flashinfer', 'fa3', 'triton', ...)")
    quantization: Optional[str] = option(None, "SGLang quantization method ('fp8', 'awq', ...); unset = none/auto")
    kv_cache_dtype: Optional[str] = option(None, "KV-cache dtype ('fp8_e4m3', ...); unset = SGLang's 'auto'")
    moe_runner_backend: Optional[str] = option(None, "MoE runner backend for MoE targets; unset = SGLang's default")
    model_loader_extra_config: Optional[dict] = option(
        None, "Extra model-loader settings (a table; passed to SGLang as JSON)", validator=_dict_or_none
    )
    disable_flashinfer_autotune: bool = option(False, "Skip FlashInfer autotuning at start-up")
    enable_multimodal: bool = option(False, "Enable SGLang's multimodal path (VLM targets)")
    enable_metrics: bool = option(False, "Collect SGLang metrics; the backend forwards them to W&B")
    dist_init_addr: Optional[str] = option(
        None, "host:port for multi-node TP rendezvous; unset = auto-negotiated (127.0.0.1:<free port> on one node)"
    )
    dist_timeout: int = option(20, "Seconds torch.distributed waits for the TP group to form", validator=positive)
    init_timeout: int = option(300, "Seconds to wait for the engine to start before failing", validator=positive)
    log_level: str = option("warning", "SGLang log level", choices=("debug", "info", "warning", "error"))
    log_requests: bool = option(False, "Log every request SGLang receives")
    log_requests_level: int = option(0, "SGLang request-log verbosity (0-3)", validator=in_range(0, 3))
    extra_args: dict = option(
        factory=dict,
        help="Any other sgl.Engine keyword, passed as is (e.g. extra_args.watchdog_timeout = 1800); "
        "keys the plugin manages are dropped with a warning",
        validator=_is_dict,
    )

    def validate_with(self, config) -> None:
        """Called by the config loader: the cross-section check, when this backend is selected."""
        if config.inference.backend == "sglang":
            check_topology(self, config)

    # ---- planning hooks (specforge_core.components, "planning")
    def engine_nodes(self) -> int:
        return self.nnodes

    def plan_notes(self, config, plan: dict):
        """``config validate``: context length and the GPU-memory budget of one engine."""
        from specforge_core.components import PlanNotes

        problems = []
        ctx, T = self.context_length, config.dataset.max_seq_length
        if ctx is not None and ctx < T:
            problems.append(("error", "inference.sglang.context_length",
                             f"{ctx} is shorter than dataset.max_seq_length {T}"))
        gpu = config.run.gpu_memory_gib * 1024**3
        if gpu and "target_weights_per_gpu" in plan:
            gib = 1024**3
            per_gpu, budget = plan["target_weights_per_gpu"], self.mem_fraction_static * gpu
            key = "inference.sglang.mem_fraction_static"
            if per_gpu > budget:
                problems.append(("error", key, f"the target's weights need {per_gpu / gib:.1f} GiB per GPU at TP "
                                 f"{plan['tp']} but {self.mem_fraction_static:g} x {config.run.gpu_memory_gib:g} GiB = "
                                 f"{budget / gib:.1f} GiB; raise TP or mem_fraction_static"))
            else:
                need_kv = plan["kv_per_token"] * config.inference.batch_size * T
                if budget - per_gpu < need_kv:
                    problems.append(("error", key, f"after {per_gpu / gib:.1f} GiB of weights per GPU, "
                                     f"{(budget - per_gpu) / gib:.2f} GiB is left for the KV cache but one batch of "
                                     f"{config.inference.batch_size} x {T} tokens needs {need_kv / gib:.2f} GiB"))
        return PlanNotes(problems=problems)


def check_topology(options: SglangOptions, config) -> None:
    need = options.nnodes * config.inference.gpus_per_engine
    if options.tp_size != need:
        raise ValueError(
            f"inference.sglang.tp_size = {options.tp_size} must equal inference.sglang.nnodes "
            f"({options.nnodes}) x inference.gpus_per_engine ({config.inference.gpus_per_engine}) = {need}; "
            "change one of them"
        )


def validate(options: SglangOptions, config) -> None:
    """Cross-section checks (need the core config as well as the options)."""
    check_topology(options, config)
    if not config.model.target:
        raise ValueError("model.target is empty; the sglang backend needs a target model path or hub id")


def split_extra_args(extra_args: dict) -> dict[str, Any]:
    """``extra_args`` minus the protected keys; warns once per dropped key, naming it and why."""
    owned = {a.name for a in attrs.fields(SglangOptions)} - {"extra_args"}
    kept: dict[str, Any] = {}
    for key, value in extra_args.items():
        if key in PROTECTED:
            why = next(g for g, keys in PROTECTED_KEYS.items() if key in keys)
            log.warning(
                "inference.sglang.extra_args.%s is managed by the sglang backend (%s); ignoring it", key, why
            )
            continue
        if key in owned:
            raise ValueError(
                f"inference.sglang.extra_args.{key}: {key!r} is an option of its own; set "
                f"inference.sglang.{key} instead"
            )
        kept[key] = value
    return kept


def engine_kwargs(
    options: SglangOptions,
    config,
    *,
    base_gpu_id: int,
    node_rank: int,
    port: int,
    nccl_port: int,
    dist_init_addr: Optional[str],
) -> dict[str, Any]:
    """The full ``sgl.Engine(**kwargs)`` mapping for one engine (pure; no sglang import)."""
    kw: dict[str, Any] = split_extra_args(options.extra_args)
    kw.update(
        # derived from other sections
        model_path=config.model.target,
        trust_remote_code=config.model.trust_remote_code,
        dtype=engine_dtype(config.inference.dtype, "cuda"),  # SGLang runs on GPUs: auto = bf16
        mem_fraction_static=options.mem_fraction_static,
        # topology, ports, networking
        tp_size=options.tp_size,
        pp_size=options.pp_size,
        dp_size=1,
        nnodes=options.nnodes,
        node_rank=node_rank,
        base_gpu_id=base_gpu_id,
        port=port,
        nccl_port=nccl_port,
        dist_timeout=options.dist_timeout,
        # capture invariants: full prompt prefilled in one forward, hidden states returned
        disable_radix_cache=True,
        chunked_prefill_size=-1,
        enable_return_hidden_states=True,
        disable_cuda_graph=True,
        skip_tokenizer_init=True,
        # essential fields
        attention_backend=options.attention_backend,
        disable_flashinfer_autotune=options.disable_flashinfer_autotune,
        enable_multimodal=options.enable_multimodal,
        enable_metrics=options.enable_metrics,
        log_level=options.log_level,
        log_requests=options.log_requests,
        log_requests_level=options.log_requests_level,
    )
    if dist_init_addr is not None:
        kw["dist_init_addr"] = dist_init_addr
    # Unset optional fields are left out so SGLang's own defaults apply.
    for name in ("context_length", "quantization", "kv_cache_dtype", "moe_runner_backend"):
        value = getattr(options, name)
        if value is not None:
            kw[name] = value
    if options.model_loader_extra_config is not None:
        kw["model_loader_extra_config"] = json.dumps(options.model_loader_extra_config)
    return kw
