"""Inference engines (the target backend inside a Ray actor) and the manager that feeds them.

Engines write features into the transfer store themselves and return only ``Result`` metadata, so
tensors never travel through the manager or the controller. The manager pulls prompts from the
controller (which applies backpressure), gives each batch to the engine with the least work in
flight, pushes results back in batches, and restarts engines that die: their in-flight prompts
return to the controller's buffer, so no sample is lost, and none is trained twice (a sample only
reaches the pool once its engine call succeeded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Optional

from specforge_core.pipeline.ray.controller import Prompt
from specforge_core.pipeline.ray.dispatch import Result

log = logging.getLogger("specforge.ray")


def feature_key(run_id: str, seq: int) -> str:
    """Deterministic per sample: a retried sample overwrites what a dead engine may have left."""
    return f"{run_id}/s{seq}"


class EngineActor:
    """One inference engine: ``inference.gpus_per_engine`` GPUs (a CPU slice on a CPU machine)."""

    def __init__(self, config: Any, samples: list, store_handle: Any, run_id: str):
        import torch

        from specforge_core.training.components import create

        self.samples = samples  # the dataset (Ray resolved the object-store reference)
        self.run_id = run_id
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = create(config, "target_backend", config, device)
        self.store = create(config, "transfer_store").connect(store_handle)

    def ready(self) -> bool:
        return True

    def generate(self, prompts: Sequence[Prompt]) -> list[Result]:
        feats = self.backend.generate([self.samples[p.index] for p in prompts])
        out = []
        for p, f in zip(prompts, feats, strict=True):
            key = feature_key(self.run_id, p.seq)
            nbytes = self.store.put(key, f.tensors())
            out.append(Result(p.seq, p.index, key, f.num_tokens, nbytes))
        return out

    def close(self) -> None:
        self.backend.close()
        self.store.close()


class InferenceManager:
    """Drives the engines until the controller's prompt buffer is empty (a Ray actor)."""

    def __init__(
        self,
        engine_cls: type,  # EngineActor (or a stand-in with the same methods); made a Ray actor here
        engine_options: Sequence[dict],  # .options(...) per engine (placement, resources, name)
        engine_args: tuple,
        *,
        batch_size: int,
        max_inflight_per_engine: int = 2,
        max_restarts: int = 3,
        name_prefix: str = "",
    ):
        import ray

        self.controller: Any = None  # given to run(): engines start loading before the plan exists
        engine_cls = ray.remote(engine_cls)
        self.engine_cls, self.engine_options, self.engine_args = engine_cls, list(engine_options), engine_args
        self.batch_size, self.depth, self.max_restarts = batch_size, max_inflight_per_engine, max_restarts
        self.name_prefix = name_prefix
        self.generation = [0] * len(self.engine_options)
        self.engines = [self._start(i) for i in range(len(self.engine_options))]
        self.restarts = 0
        self.batches = 0
        self.stopping = False
        self.timing = {"loops": 0, "exchange_s": 0.0, "wait_s": 0.0}

    def _start(self, i: int) -> Any:
        opts = dict(self.engine_options[i])
        if self.name_prefix:
            opts["name"] = f"{self.name_prefix}engine-{i}.{self.generation[i]}"
        return self.engine_cls.options(**opts).remote(*self.engine_args)

    def ready(self) -> int:
        import ray

        ray.get([e.ready.remote() for e in self.engines])
        return len(self.engines)

    def stop(self) -> None:
        self.stopping = True

    def stats(self) -> dict[str, int]:
        return {"engines": len(self.engines), "restarts": self.restarts, "batches": self.batches,
                **{k: round(v, 3) for k, v in self.timing.items()}}

    def _restart(self, i: int, cause: BaseException) -> None:
        import ray

        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(
                f"inference engine {i} died and inference.max_restarts = {self.max_restarts} restarts "
                f"are used up: {cause}"
            ) from cause
        log.warning("inference engine %d died (%s); restarting it (%d/%d)", i, cause, self.restarts, self.max_restarts)
        try:
            ray.kill(self.engines[i], no_restart=True)
        except Exception:  # already gone
            pass
        self.generation[i] += 1
        self.engines[i] = self._start(i)

    def run(self, controller: Any) -> dict[str, int]:
        import ray
        from ray.exceptions import RayActorError

        self.controller = controller
        n = len(self.engines)
        inflight: dict[Any, tuple[int, int, list[Prompt]]] = {}  # ref -> (engine, generation, prompts)
        load = [0] * n  # batches in flight per engine
        load_tokens = [0] * n
        idle_wait = 0.002
        results: list[Result] = []
        while not self.stopping:
            # -- one controller call per loop: push what finished, take prompts for free slots
            free = sum(self.depth - x for x in load)
            t = time.perf_counter()
            prompts, has_work = ray.get(self.controller.exchange.remote(results, free * self.batch_size))
            self.timing["exchange_s"] += time.perf_counter() - t
            self.timing["loops"] += 1
            results = []
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                # least loaded engine with a free slot (by batches, then tokens)
                i = min((j for j in range(n) if load[j] < self.depth), key=lambda j: (load[j], load_tokens[j]))
                ref = self.engines[i].generate.remote(batch)
                inflight[ref] = (i, self.generation[i], batch)
                load[i] += 1
                load_tokens[i] += sum(p.num_tokens for p in batch)
                self.batches += 1
            if not inflight:
                if not has_work:
                    break  # every prompt is done
                time.sleep(idle_wait)  # backpressure: wait for trainers to consume
                idle_wait = min(idle_wait * 2, 0.05)
                continue
            idle_wait = 0.002
            t = time.perf_counter()
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            self.timing["wait_s"] += time.perf_counter() - t
            if not ready:
                continue
            ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)  # batch what's done
            for ref in ready:
                i, gen, batch = inflight.pop(ref)
                if gen == self.generation[i]:
                    load[i] -= 1
                    load_tokens[i] -= sum(p.num_tokens for p in batch)
                try:
                    results.extend(ray.get(ref))
                except RayActorError as exc:
                    # the engine died: its prompts go back to the buffer; restart it once per death
                    ray.get(self.controller.return_prompts.remote([p.seq for p in batch]))
                    if gen == self.generation[i]:
                        self._drop_engine_refs(inflight, i, gen)
                        load[i], load_tokens[i] = 0, 0
                        self._restart(i, exc)
                except Exception as exc:  # the backend raised on this batch: skip it, with the reason
                    log.error("inference engine %d failed on a batch: %s", i, exc)
                    reason = f"inference error ({type(getattr(exc, 'cause', exc)).__name__})"
                    ray.get(self.controller.skip_prompts.remote([p.seq for p in batch], reason))
        if results:
            ray.get(self.controller.exchange.remote(results, 0))
        return self.stats()

    def _drop_engine_refs(self, inflight: dict, i: int, gen: int) -> None:
        """Other batches queued on a dead engine: return their prompts now."""
        import ray

        dead = [ref for ref, (j, g, _) in inflight.items() if j == i and g == gen]
        seqs = [p.seq for ref in dead for p in inflight.pop(ref)[2]]
        if seqs:
            ray.get(self.controller.return_prompts.remote(seqs))

    def close(self, timeout_s: float = 30.0) -> None:
        import ray

        refs = [e.close.remote() for e in self.engines]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for e in self.engines:
            ray.kill(e, no_restart=True)

    def engine_handle(self, i: int) -> Optional[Any]:
        return self.engines[i]
