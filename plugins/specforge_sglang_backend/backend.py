"""``TargetBackend`` over ``sglang.Engine``: prefill-only requests that return, per prompt token, the
EAGLE-3 aux hidden states, the final (post-norm) hidden state and the full-vocab argmax.

See docs/sglang.md for the capture mechanism and why it needs no patched SGLang.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from specforge_core.plugin_api import dtype_from_engine, target_info_for
from specforge_core.types import Sample, TargetFeatures
from specforge_sglang_backend.capture import MAX_VOCAB, split_rows
from specforge_sglang_backend.options import SglangOptions, engine_kwargs, validate

log = logging.getLogger(__name__)

MODEL_PACKAGE = "specforge_sglang_backend.sgl_models"
CAPTURE_ENV = "SPECFORGE_SGLANG_CAPTURE"
ARGMAX_CHUNK = 2048  # tokens per lm_head chunk for the in-engine argmax


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_index(device: Optional[str]) -> int:
    """'cuda:3' -> 3; None / 'cuda' / 'auto' -> 0 (Ray already narrows CUDA_VISIBLE_DEVICES)."""
    if device and ":" in device:
        return int(device.rsplit(":", 1)[1])
    return 0


def import_engine_class() -> Callable[..., Any]:
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            "inference.backend = 'sglang' needs SGLang on a CUDA machine: install specforge-train[sglang] "
            f"(see docs/sglang.md for tested versions); import failed: {e}"
        ) from e
    return sglang.Engine


def adapt_to_server_args(kwargs: dict, field_names: Optional[set[str]]) -> dict:
    """Fit the kwargs to the installed SGLang's ServerArgs (fields come and go between versions)."""
    if field_names is None:
        return kwargs
    out = dict(kwargs)
    if "return_hidden_states_mode" in field_names:  # newer SGLang: per-token rows need 'full'
        out["return_hidden_states_mode"] = "full"
    for key in ("disable_flashinfer_autotune", "enable_multimodal", "enable_metrics", "log_requests_level"):
        if key not in field_names and key in out:
            value = out.pop(key)
            if value:
                raise ValueError(f"inference.sglang.{key} = {value!r}: the installed SGLang has no such setting")
    unknown = sorted(set(out) - field_names)
    if unknown:
        raise ValueError(
            f"sgl.Engine does not accept {unknown} in the installed SGLang version; "
            "remove them from inference.sglang.extra_args"
        )
    return out


class SglangTargetBackend:
    """``TargetBackend`` over one ``sgl.Engine`` (see docs/sglang.md).

    ``engine_cls`` defaults to ``sglang.Engine`` (imported here, never at module import); tests pass
    a stand-in. ``node_rank`` / ``dist_init_addr`` are for multi-node TP, where the pipeline starts
    one backend per node with the same address.
    """

    def __init__(
        self,
        options: SglangOptions,
        config,
        device: Optional[str] = None,
        *,
        node_rank: int = 0,
        dist_init_addr: Optional[str] = None,
        engine_cls: Optional[Callable[..., Any]] = None,
        server_arg_names: Optional[set[str]] = None,
    ):
        validate(options, config)
        self.options = options
        m = config.model
        self.info = target_info_for(config)
        if self.info.vocab_size >= MAX_VOCAB:
            raise ValueError(f"vocab_size {self.info.vocab_size} is too large for the argmax encoding")
        archs = self.info.hf_config.get("architectures") or []
        if not archs:
            raise ValueError(f"{m.target}: config.json has no 'architectures'; SGLang cannot pick a model class")

        if engine_cls is None:
            engine_cls = import_engine_class()
            from sglang.srt.server_args import ServerArgs

            server_arg_names = {f.name for f in dataclasses.fields(ServerArgs)}

        addr = dist_init_addr or options.dist_init_addr
        if addr is None:
            if options.nnodes > 1:
                raise ValueError(
                    "inference.sglang.nnodes > 1 needs a rendezvous address: set inference.sglang.dist_init_addr "
                    "(host:port of node 0) or let the pipeline pass one"
                )
            addr = f"127.0.0.1:{free_port()}"
        kwargs = engine_kwargs(
            options, config, base_gpu_id=gpu_index(device), node_rank=node_rank,
            port=free_port(), nccl_port=free_port(), dist_init_addr=addr,
        )
        self.engine_kwargs = adapt_to_server_args(kwargs, server_arg_names)
        self.dtype = dtype_from_engine(self.engine_kwargs["dtype"])
        self._set_capture_env(archs)
        self.engine = self._start(engine_cls)
        self.stats = {"samples": 0, "tokens": 0, "seconds": 0.0}

    # ------------------------------------------------------------------------------- start-up
    def _set_capture_env(self, archs: list[str]) -> None:
        # The scheduler processes inherit os.environ: this is how the capture spec reaches them.
        current = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
        if current and current != MODEL_PACKAGE:
            raise ValueError(
                f"SGLANG_EXTERNAL_MODEL_PACKAGE={current!r} is set; the sglang backend needs "
                f"{MODEL_PACKAGE!r} there to capture hidden states. Unset it."
            )
        os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = MODEL_PACKAGE
        os.environ[CAPTURE_ENV] = json.dumps(
            {
                "architectures": list(archs),
                "aux_layers": self.info.aux_layer_ids,
                "vocab_size": self.info.vocab_size,
                "argmax_chunk": ARGMAX_CHUNK,
            }
        )

    def _start(self, engine_cls: Callable[..., Any]) -> Any:
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["engine"] = engine_cls(**self.engine_kwargs)
            except BaseException as e:  # surfaced in the caller's thread below
                result["error"] = e

        t = threading.Thread(target=run, name="sglang-engine-init", daemon=True)
        t.start()
        t.join(self.options.init_timeout)
        if t.is_alive():
            raise TimeoutError(
                f"sgl.Engine did not start within inference.sglang.init_timeout = {self.options.init_timeout} s "
                f"(model {self.info.model_path!r}, tp_size {self.options.tp_size}); raise init_timeout for "
                "large models or check the SGLang log (inference.sglang.log_level = 'info')"
            )
        if "error" in result:
            raise RuntimeError(f"sgl.Engine failed to start: {result['error']}") from result["error"]
        return result["engine"]

    # ------------------------------------------------------------------------------- generate
    def _check(self, s: Sample) -> None:
        ids = s.input_ids
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"sample {s.sample_id!r}: input_ids must be a non-empty 1-D tensor, got {tuple(ids.shape)}")
        if s.loss_mask.shape != ids.shape:
            raise ValueError(f"sample {s.sample_id!r}: loss_mask shape {tuple(s.loss_mask.shape)} != input_ids shape")
        if int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size:
            raise ValueError(
                f"sample {s.sample_id!r}: token ids must lie in [0, {self.info.vocab_size}) (the target's vocab_size)"
            )

    def generate(self, samples: Sequence[Sample]) -> list[TargetFeatures]:
        if not samples:
            return []
        for s in samples:
            self._check(s)
        t0 = time.perf_counter()
        # max_new_tokens=1: the prompt is prefilled in one forward and the request ends there; the
        # sampled token is discarded. Greedy so no sampling state is built.
        outputs = self.engine.generate(
            input_ids=[s.input_ids.tolist() for s in samples],
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            return_hidden_states=True,
        )
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != len(samples):
            raise RuntimeError(f"sgl.Engine returned {len(outputs)} outputs for {len(samples)} prompts")
        feats = [self._features(s, out) for s, out in zip(samples, outputs, strict=True)]
        self.stats["samples"] += len(samples)
        self.stats["tokens"] += sum(s.num_tokens for s in samples)
        self.stats["seconds"] += time.perf_counter() - t0
        return feats

    def _features(self, sample: Sample, out: dict) -> TargetFeatures:
        T = sample.num_tokens
        hs = out.get("meta_info", {}).get("hidden_states")
        if not hs:
            raise RuntimeError(
                f"sample {sample.sample_id!r}: SGLang returned no hidden states (meta_info keys: "
                f"{sorted(out.get('meta_info', {}))}); is enable_return_hidden_states honoured by this version?"
            )
        # hs[0] holds the prompt rows from the prefill; later entries (if any) are decode steps.
        rows = torch.as_tensor(hs[0], dtype=torch.float32)
        if rows.shape[0] != T:
            raise RuntimeError(
                f"sample {sample.sample_id!r}: SGLang returned hidden states for {rows.shape[0]} tokens, "
                f"the prompt has {T} (a prefix-cache hit or chunked prefill would do this)"
            )
        aux, final, argmax = split_rows(rows, len(self.info.aux_layer_ids), self.info.hidden_size)
        return TargetFeatures(
            sample_id=sample.sample_id,
            input_ids=sample.input_ids.to(torch.int64).clone(),
            loss_mask=sample.loss_mask.to(torch.uint8).clone(),
            aux_hidden=aux.to(self.dtype).contiguous(),
            final_hidden=final.to(self.dtype).contiguous(),
            target_argmax=argmax,
            category=sample.category,
        )

    def metrics(self) -> dict[str, float]:
        """Throughput counters (the pipeline logs them to W&B when inference.sglang.enable_metrics)."""
        m = dict(self.stats)
        m["tokens_per_second"] = m["tokens"] / m["seconds"] if m["seconds"] else 0.0
        return {f"sglang/{k}": float(v) for k, v in m.items()}

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()
