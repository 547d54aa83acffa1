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
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Optional

import numpy as np

from specforge_core.pipeline.ray.controller import PromptBatch
from specforge_core.pipeline.ray.dispatch import ResultBatch

log = logging.getLogger("specforge.ray")


def feature_key(run_id: str, seq: int) -> str:
    """Deterministic per sample: a retried sample overwrites what a dead engine may have left."""
    return f"{run_id}/s{seq}"


def _concat(batches: list[tuple]) -> tuple:
    return ResultBatch.concat([ResultBatch.from_wire(b) for b in batches]).wire()


class EngineActor:
    """One inference engine: ``inference.gpus_per_engine`` GPUs (a CPU slice on a CPU machine)."""

    def __init__(self, config: Any, samples: list, store_handle: Any, run_id: str):
        import torch

        from specforge_core.build import create  # lazy: the manager process never loads torch

        self.samples = samples  # the dataset (Ray resolved the object-store reference)
        self.run_id = run_id
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = create(config, "target_backend", config, device)
        self.store = create(config, "transfer_store").connect(store_handle)
        # puts release the GIL (file writes, copies): a batch's samples are written in parallel
        self.writers = ThreadPoolExecutor(config.transfer.put_threads, thread_name_prefix="put")

    def ready(self) -> bool:
        return True

    def generate(self, prompts: tuple) -> tuple:
        """Features of a batch of prompts (``PromptBatch`` wire tuple) into the store; their
        metadata back as columns (``ResultBatch`` wire tuple)."""
        prompts = PromptBatch.from_wire(prompts)
        feats = self.backend.generate([self.samples[i] for i in prompts.index.tolist()])
        if len(feats) != prompts.n:
            raise RuntimeError(f"target backend returned {len(feats)} results for {prompts.n} prompts")
        keys = [feature_key(self.run_id, seq) for seq in prompts.seq.tolist()]
        tokens = [f.num_tokens for f in feats]
        puts = [self.writers.submit(self.store.put, k, f.tensors()) for k, f in zip(keys, feats, strict=True)]
        wait(puts)  # all of them, failed or not, before any cleanup
        if any(p.exception() is not None for p in puts):
            # the batch fails as a whole (the manager skips its prompts, with the reason): what
            # its other puts wrote must not stay in the store
            self.store.delete(keys)
        nbytes = [p.result() for p in puts]  # re-raises the first failure
        return ResultBatch(prompts.seq, prompts.index, keys, np.asarray(tokens, np.int64),
                           np.asarray(nbytes, np.int64)).wire()

    def close(self) -> None:
        self.writers.shutdown(wait=True)
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

    def held_out(self, prompts: tuple) -> tuple:
        """Features of the held-out samples (``training.eval_every``; a ``PromptBatch`` wire, seqs
        apart from the training stream's) into the store, next to ``run`` (this actor is threaded):
        batches of ``batch_size`` over the engines, outside the controller and its accounting.
        A batch whose engine died is tried again on the next engine (``run`` restarts dead
        ones). Returns their ``ResultBatch`` wire."""
        import ray
        from ray.exceptions import RayActorError

        prompts = PromptBatch.from_wire(prompts)
        batches = [prompts.slice(s, s + self.batch_size) for s in range(0, prompts.n, self.batch_size)]
        refs = [self.engines[k % len(self.engines)].generate.remote(b.wire()) for k, b in enumerate(batches)]
        out = []
        for k, (batch, ref) in enumerate(zip(batches, refs, strict=True)):
            for attempt in range(1, self.max_restarts + 2):
                try:
                    out.append(ray.get(ref))
                    break
                except RayActorError:
                    if attempt > self.max_restarts:
                        raise
                    time.sleep(1.0)
                    ref = self.engines[(k + attempt) % len(self.engines)].generate.remote(batch.wire())
        return _concat(out)

    def run(self, controller: Any) -> dict[str, int]:
        """The loop: one ``exchange`` with the controller (returns of dead engines' prompts,
        finished results and the request for new prompts ride on the same call), then batches to
        the least loaded engines, then wait for whatever finishes. Up to ``max_inflight_per_engine``
        batches are in flight per engine, so engines never wait for the manager's round trip."""
        import ray
        from ray.exceptions import RayActorError

        self.controller = controller
        n = len(self.engines)
        inflight: dict[Any, tuple[int, int, PromptBatch]] = {}  # ref -> (engine, generation, prompts)
        load = [0] * n  # batches in flight per engine
        load_tokens = [0] * n
        idle_wait = 0.002
        results: list[ResultBatch] = []  # wire tuples of finished batches
        failed: list[np.ndarray] = []  # seqs of dead engines' prompts, back to the buffer
        while not self.stopping:
            free = sum(self.depth - x for x in load)
            t = time.perf_counter()
            prompts, has_work = ray.get(self.controller.exchange.remote(
                _concat(results), free * self.batch_size,
                np.concatenate(failed) if failed else ()))
            self.timing["exchange_s"] += time.perf_counter() - t
            self.timing["loops"] += 1
            prompts = PromptBatch.from_wire(prompts)
            results, failed = [], []
            for start in range(0, prompts.n, self.batch_size):
                batch = prompts.slice(start, start + self.batch_size)
                # least loaded engine with a free slot (by batches, then tokens)
                i = min((j for j in range(n) if load[j] < self.depth), key=lambda j: (load[j], load_tokens[j]))
                ref = self.engines[i].generate.remote(batch.wire())
                inflight[ref] = (i, self.generation[i], batch)
                load[i] += 1
                load_tokens[i] += int(batch.num_tokens.sum())
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
            try:
                got = ray.get(ready)  # the common case: one call for every finished batch
            except Exception:
                got = None  # some batch failed: sort them out one by one below
            for k, ref in enumerate(ready):
                if ref not in inflight:
                    continue  # dropped with its dead engine
                i, gen, batch = inflight.pop(ref)
                if gen == self.generation[i]:
                    load[i] -= 1
                    load_tokens[i] -= int(batch.num_tokens.sum())
                try:
                    results.append(got[k] if got is not None else ray.get(ref))
                except RayActorError as exc:
                    # the engine died: its prompts go back to the buffer; restart it once per death
                    failed.append(batch.seq)
                    if gen == self.generation[i]:
                        failed.extend(self._drop_engine_refs(inflight, i, gen))
                        load[i], load_tokens[i] = 0, 0
                        self._restart(i, exc)
                except Exception as exc:  # the backend raised on this batch: skip it, with the reason
                    log.error("inference engine %d failed on a batch: %s", i, exc)
                    reason = f"inference error ({type(getattr(exc, 'cause', exc)).__name__})"
                    ray.get(self.controller.skip_prompts.remote(batch.seq, reason))
        if results or failed:
            ray.get(self.controller.exchange.remote(_concat(results), 0,
                                                    np.concatenate(failed) if failed else ()))
        return self.stats()

    def _drop_engine_refs(self, inflight: dict, i: int, gen: int) -> list[np.ndarray]:
        """Other batches queued on a dead engine: their prompts go back to the buffer too."""
        dead = [ref for ref, (j, g, _) in inflight.items() if j == i and g == gen]
        return [inflight.pop(ref)[2].seq for ref in dead]

    def close(self, timeout_s: float = 30.0) -> None:
        import ray

        refs = [e.close.remote() for e in self.engines]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for e in self.engines:
            ray.kill(e, no_restart=True)

    def engine_handle(self, i: int) -> Optional[Any]:
        return self.engines[i]
