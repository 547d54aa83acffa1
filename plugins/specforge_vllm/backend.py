"""The ``vllm`` target backend: the target runs in a real vLLM, in a process of its own.

vLLM pins its own torch and transformers, so it usually lives in a venv apart from the project's.
The backend starts ``capture_runner.py`` (this package's directory on ``PYTHONPATH``) with that
venv's Python once, talks JSON lines over pipes, and gets the tensors back as safetensors files in
a memory-backed directory (``/dev/shm``): vLLM writes each sample's features once, the backend reads
them once and deletes them. See capture_runner.py for how vLLM captures them (its
``extract_hidden_states`` speculative method, a KV connector and a worker extension; no patching).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from specforge_core.plugin_api import dtype_from_engine, engine_dtype, target_info_for
from specforge_core.types import Sample, TargetFeatures
from specforge_vllm.options import VLLMBackendOptions, split_extra_args

RUNNER = Path(__file__).with_name("capture_runner.py")


class VLLMError(RuntimeError):
    """vLLM failed (to start, or on a batch); the message quotes the tail of its log."""


def resolve_dtype(dtype: str, device: Optional[str]) -> str:
    """``inference.dtype`` as vLLM's dtype string; 'auto' = bf16 on GPU, fp32 on CPU (as ``hf``),
    resolved here, not by vLLM (whose 'auto' follows config.json and may differ from hf)."""
    return engine_dtype(dtype, device, "inference.dtype")


def find_python(option: str) -> str:
    """The interpreter vLLM runs under: the option, ``$SPECFORGE_VLLM_PYTHON``, this interpreter
    when it imports vllm, else the venv the plugin's discovery finds (``venv.py``)."""
    import importlib.util
    import sys

    for source, value in (("inference.vllm.python", option),
                          ("$SPECFORGE_VLLM_PYTHON", os.environ.get("SPECFORGE_VLLM_PYTHON", ""))):
        if value:
            if not (os.path.isfile(value) and os.access(value, os.X_OK)):
                raise FileNotFoundError(f"{source} = {value!r} is not an executable file")
            return value
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    try:
        from specforge_vllm import venv
    except ImportError:
        venv = None
    found = getattr(venv, "find_vllm_python", lambda: None)() if venv is not None else None
    if found:
        return str(found)
    raise FileNotFoundError(
        "no vLLM found: set inference.vllm.python (or $SPECFORGE_VLLM_PYTHON) to the Python of a venv "
        "with vllm installed (see docs/target-backends.md, 'The vllm backend')"
    )


def default_max_model_len(config, info) -> int:
    return int(config.dataset.max_seq_length) + 1


class _Runner:
    """The vLLM process: start, one request/reply at a time, stop. Thread-safe (one lock)."""

    def __init__(self, python: str, spec: dict[str, Any], env: dict[str, str], log_path: str, timeout: float):
        self.log_path = log_path
        self.lock = threading.Lock()
        self.log = open(log_path, "ab")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [python, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            env=env, text=True, bufsize=1, start_new_session=True,
        )
        try:
            self.info = self.reply_of(spec, timeout, what="starting vLLM")
        except BaseException:
            self.kill()
            self.log.close()
            raise

    def tail(self, n: int = 40) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def reply_of(self, request: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
        with self.lock:
            if self.proc.poll() is not None:
                raise VLLMError(f"{what}: the vLLM process has exited (code {self.proc.returncode}); "
                                f"log {self.log_path}:\n{self.tail()}")
            assert self.proc.stdin is not None and self.proc.stdout is not None
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass  # the readline below reports the exit
            line = _readline(self.proc.stdout, timeout)
        if line is None:
            self.kill()
            raise VLLMError(f"{what}: no answer from vLLM within {timeout:g} s; log {self.log_path}:\n{self.tail()}")
        if not line:
            code = self.proc.wait()
            raise VLLMError(f"{what}: the vLLM process exited (code {code}); log {self.log_path}:\n{self.tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise VLLMError(f"{what}: {reply.get('error')}\n{reply.get('trace', '')}")
        return reply

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            try:
                self.reply_of({"op": "close"}, timeout, what="closing vLLM")
                self.proc.wait(timeout)
            except (VLLMError, subprocess.TimeoutExpired, OSError, ValueError):
                self.kill()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its own session: the runner only; vLLM's children exit with their pipes
            self.proc.wait()


def _readline(stream, timeout: float) -> Optional[str]:
    """One line from ``stream``, '' at EOF, None after ``timeout`` seconds."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


class VLLMTargetBackend:
    """``TargetBackend`` over a vLLM engine in a subprocess (see docs/target-backends.md)."""

    def __init__(self, options: VLLMBackendOptions, config, device: Optional[str] = None):
        self.options = options
        m = config.model
        self.info = target_info_for(config)
        self.max_positions = self.info.hf_config.get("max_position_embeddings")
        self.batch_size = config.inference.batch_size
        self.vllm_dtype = resolve_dtype(config.inference.dtype, device)
        self.dtype = dtype_from_engine(self.vllm_dtype)
        self.max_model_len = options.max_model_len or default_max_model_len(config, self.info)
        python = find_python(options.python)

        base = options.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        if base:
            os.makedirs(base, exist_ok=True)
        self.workdir = tempfile.mkdtemp(prefix="specforge-vllm-", dir=base)
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join([str(RUNNER.parent)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
            "VLLM_LOGGING_LEVEL": options.log_level,
            "VLLM_CPU_KVCACHE_SPACE": f"{options.cpu_kvcache_space_gib:g}",
            "PYTHONUNBUFFERED": "1",
        })
        if self.max_positions and self.max_model_len > int(self.max_positions):
            # The one position past the model's range only ever holds the sampled token, which is
            # never fed through the model: safe, but vLLM wants it acknowledged.
            env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        env.update({str(k): str(v) for k, v in options.env.items()})
        spec = {
            "workdir": self.workdir,
            "model": m.target,
            "dtype": self.vllm_dtype,
            "trust_remote_code": m.trust_remote_code,
            "aux_layer_ids": list(self.info.aux_layer_ids),
            "num_hidden_layers": self.info.num_hidden_layers,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": options.tensor_parallel_size,
            "enforce_eager": options.enforce_eager,
            "argmax_chunk_size": options.argmax_chunk_size,
            "engine_kwargs": split_extra_args(options.extra_args),
        }
        if (device or "").startswith("cuda"):
            spec["gpu_memory_utilization"] = options.gpu_memory_utilization
        log_path = options.log_file or os.path.join(self.workdir, "runner.log")
        self.python = python
        try:
            self._runner: Optional[_Runner] = _Runner(python, spec, env, log_path, options.start_timeout)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        # A backend nobody closed must not leave vLLM running (or its files in /dev/shm); weakref
        # finalizers also run at interpreter exit.
        self._finalizer = weakref.finalize(self, _cleanup, self._runner, self.workdir)

    # ------------------------------------------------------------------------------- generate
    def _check(self, sample: Sample) -> None:
        ids, mask = sample.input_ids, sample.loss_mask
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"sample {sample.sample_id!r}: input_ids must be a non-empty 1-D tensor, got {tuple(ids.shape)}")
        if mask.shape != ids.shape:
            raise ValueError(
                f"sample {sample.sample_id!r}: loss_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
            )
        if self.max_positions is not None and ids.numel() > self.max_positions:
            raise ValueError(
                f"sample {sample.sample_id!r} has {ids.numel()} tokens but the target {self.info.model_path!r} "
                f"supports at most max_position_embeddings = {self.max_positions}; lower dataset.max_seq_length"
            )
        if ids.numel() >= self.max_model_len:
            raise ValueError(
                f"sample {sample.sample_id!r} has {ids.numel()} tokens but inference.vllm.max_model_len = "
                f"{self.max_model_len} leaves room for at most {self.max_model_len - 1}"
            )
        hi = int(ids.max())
        if int(ids.min()) < 0 or hi >= self.info.vocab_size:
            raise ValueError(
                f"sample {sample.sample_id!r}: token ids must lie in [0, {self.info.vocab_size}) "
                f"(the target's vocab_size); got max {hi} (tokenized with another tokenizer?)"
            )

    def _request(self, request: dict[str, Any], what: str) -> dict[str, Any]:
        if self._runner is None:
            raise VLLMError("the vllm backend is closed")
        return self._runner.reply_of(request, self.options.request_timeout, what)

    def generate(self, samples: Sequence[Sample]) -> list[TargetFeatures]:
        for s in samples:
            self._check(s)
        out: list[TargetFeatures] = []
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start : start + self.batch_size]
            reply = self._request({"op": "features", "input_ids": [s.input_ids.tolist() for s in batch]},
                                  what=f"features of {len(batch)} samples")
            for s, path in zip(batch, reply["files"], strict=True):
                t = load_file(path)
                os.remove(path)
                out.append(TargetFeatures(
                    sample_id=s.sample_id,
                    input_ids=s.input_ids.to(torch.int64).clone(),
                    loss_mask=s.loss_mask.to(torch.uint8).clone(),
                    aux_hidden=t["aux_hidden"].to(self.dtype),
                    final_hidden=t["final_hidden"].to(self.dtype),
                    target_argmax=t["target_argmax"].to(torch.int64),
                    category=s.category,
                ))
        return out

    # --------------------------------------------------------------------------- generate_text
    def generate_text(self, prompts: Sequence[Any], params: Any = None) -> list[Any]:
        """Text generation by the same engine (``specforge data regenerate``): one
        ``GeneratedText`` per token-id prompt, in order; vLLM batches them itself."""
        from specforge_core.components import GeneratedText, GenerationParams

        p = params if params is not None else GenerationParams()
        ids = [x.tolist() if isinstance(x, torch.Tensor) else [int(t) for t in x] for x in prompts]
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"prompt {i} is empty")
            if len(x) + p.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(x)} tokens; with max_new_tokens = {p.max_new_tokens} it needs "
                    f"max_model_len >= {len(x) + p.max_new_tokens} but the vllm backend has {self.max_model_len} "
                    "(set inference.vllm.max_model_len)"
                )
        sampling = {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_new_tokens,
                    "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids), "seed": p.seed}
        reply = self._request({"op": "generate", "input_ids": ids, "sampling": sampling},
                              what=f"generating for {len(ids)} prompts")
        return [GeneratedText(token_ids=o["token_ids"], text=o["text"],
                              finish_reason="length" if o["finish_reason"] == "length" else "stop")
                for o in reply["outputs"]]

    def close(self) -> None:
        self._finalizer()
        self._runner = None


def _cleanup(runner: Optional[_Runner], workdir: str) -> None:
    if runner is not None:
        runner.stop()
    shutil.rmtree(workdir, ignore_errors=True)
