"""``run_ray``: the disaggregated pipeline on Ray, a driver of the same ``run.recipe.Run``.

Same components, TOML and run phases as ``run_local``, but target inference and draft training
run in separate Ray actors on separate GPU groups and scale independently; each trainer actor runs
the run's step loop over a batch source the controller feeds::

    driver ── Run: prepare (data, vocab, plan), console + W&B observers, wrap-up ──────────┐
    ControllerActor  (metadata: prompt buffer, result pool, one queue per trainer rank)     │
      ▲ exchange (results in, prompts out,     ▲ pull (a batch of steps per call, carrying  │
      │   failed prompts back: one call)        │   consumed/trained acks) / ack / report     │
    InferenceManager ─ generate(prompts) ─▶ EngineActor x N ── put ─▶ transfer store ─ get ─▶ TrainerActor x dp
                                             (target backend)       (shm / mooncake)       (StepLoop: fsdp2 / local)

A store that supplies features (the disk cache of ``specforge data features``) needs no inference:
the driver hands the controller every sample as ready, and trainers read them from the cache.

See docs/pipeline.md for placement, multi-node use and fault behaviour.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import attrs
import ray

from specforge_core.build import create
from specforge_core.components import capability
from specforge_core.config.schema import SpecforgeConfig
from specforge_core.pipeline.ray import leftovers
from specforge_core.pipeline.ray import placement as pl
from specforge_core.pipeline.ray.controller import ControllerActor, Prompt
from specforge_core.pipeline.ray.held_out import HeldOutPlan
from specforge_core.pipeline.ray.inference import EngineActor, InferenceManager
from specforge_core.pipeline.ray.trainer_actor import TrainerActor
from specforge_core.run.held_out import chain_prompts, line_observers
from specforge_core.run.observers import Observer, StepRecord
from specforge_core.run.order import StepPlan
from specforge_core.run.recipe import Run, RunResult
from specforge_core.target import target_info_for
from specforge_core.training import checkpoint as ckpt

# environment a worker on another node needs to behave like this driver
_FORWARD_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MC_TCP_BIND_ADDRESS", "TOKENIZERS_PARALLELISM")


@attrs.define
class RayRunResult(RunResult):
    controller: dict[str, Any] = attrs.field(factory=dict)  # the controller's summary + engine stats


def connect_ray(config: SpecforgeConfig) -> bool:
    """Join ``run.ray_address`` / ``$RAY_ADDRESS`` or start a local cluster; True if we started
    (or joined) Ray here and must shut it down at the end."""
    if ray.is_initialized():
        return False
    for message in leftovers.sweep():  # what a kill -9'd driver's local cluster left on this host
        warnings.warn(message, stacklevel=2)
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    else:
        ray.init(include_dashboard=False)
        leftovers.record_current_cluster()  # removed at ray.shutdown below; a dead driver's is swept
    return True


def _shutdown_ray() -> None:
    ray.shutdown()
    leftovers.forget()


def resolve_store(config: SpecforgeConfig) -> SpecforgeConfig:
    """The Ray pipeline's default store is ``shm`` (one node). The ``local`` store only lives in
    one process, so asking for it explicitly is an error; ``shm`` across nodes is too."""
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    store = config.transfer.store
    if store == "local":
        if "transfer.store" in config.sources:
            raise ValueError(
                f"transfer.store = 'local' ({config.sources['transfer.store']}) only works inside one "
                "process; with run.pipeline = 'ray' use 'shm' (one node) or 'mooncake' (several nodes)"
            )
        store = "shm"
    if store == "shm" and nodes > 1:
        raise ValueError(
            f"transfer.store = 'shm' is shared memory of one node, but the Ray cluster has {nodes} nodes; "
            "use transfer.store = 'mooncake'"
        )
    return attrs.evolve(config, transfer=attrs.evolve(config.transfer, store=store))


def plan_prompts(plan: StepPlan, usable: list, start_step: int) -> tuple[list[Prompt], dict[int, dict]]:
    """The run's sample stream from ``start_step`` on: prompts tagged with their optimizer step,
    and the data position after each step (what a checkpoint of that step records)."""
    prompts, positions, seq = [], {}, 0
    for step in plan.walk(start_step):
        for i in step.indices:
            prompts.append(Prompt(seq, i, usable[i].num_tokens, step.step))
            seq += 1
        positions[step.step] = step.position
    return prompts, positions


def _kill(actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already dead
            pass


def run_ray(
    config: SpecforgeConfig,
    *,
    stop_after_steps: Optional[int] = None,  # trainers end early as if killed (tests of resume)
    console: Any = None,
    target_backend: Any = None,  # not supported: engines build theirs inside Ray actors
    transfer_store: Any = None,  # a ready-made provider of a registered store (actors connect via the registry)
) -> RayRunResult:
    if target_backend is not None:
        raise ValueError(
            "run.pipeline = 'ray' builds the target backend inside each inference actor from the config; "
            "a ready-made target_backend instance cannot be moved there (use run.pipeline = 'local')"
        )
    with Run(config, console=console) as run:
        # ---- prepare: as the local pipeline, with the target's facts read from its files (no
        # weights on the driver) and one step spread over num_gpus trainer ranks
        run.claim_output_dir()
        if connect_ray(config):
            run.cleanup.callback(_shutdown_ray)
        run.write_config(resolve_store(config))
        run.load_data()
        info = target_info_for(run.config)
        run.plan_steps(info.vocab_size, ranks=run.config.training.num_gpus)
        return RayRun(run, info, transfer_store).train(stop_after_steps)


class RayRun:
    """The actors of one Ray run: placement, store, trainers, inference (or the cache), controller."""

    def __init__(self, run: Run, info: Any, transfer_store: Any = None):
        self.run, self.info = run, info
        config = run.config
        self.placement = pl.plan_placement(config)
        run.cleanup.callback(pl.remove, self.placement)
        run.console.print(f"ray: {self.placement.describe()}; transfer store '{config.transfer.store}'")
        provider = transfer_store if transfer_store is not None else create(config, "transfer_store")
        self.from_cache = bool(capability(provider, "TransferStoreProvider.supplies_features"))
        configure = capability(provider, "TransferStoreProvider.configure")
        if configure is not None:  # e.g. mooncake sizes its buffers from the model
            configure(info.hidden_size, len(info.aux_layer_ids), config.dataset.max_seq_length,
                      config.transfer.max_pool_bytes, 4 if self.placement.use_gpu is False else 2)
        self.run_id = f"{config.run.name}-{uuid.uuid4().hex[:8]}".replace("/", "_")
        self.handle = provider.start(self.run_id)
        self.store = provider.connect(self.handle)
        run.cleanup.callback(provider.stop, self.handle)
        run.cleanup.callback(self.store.close)
        self.actors: list = []
        self.manager: Any = None

    def train(self, stop_after_steps: Optional[int]) -> RayRunResult:
        run = self.run
        try:
            result, summary, stats, trained, skipped_idx = self._train(stop_after_steps)
        except BaseException as exc:
            from ray.exceptions import RayActorError

            # stop the actors before looking: a trainer still saving would otherwise complete a newer
            # checkpoint after this message named an older one
            _kill(self.actors)
            latest = ckpt.latest_checkpoint(run.out_dir)
            where = f"last complete checkpoint: {latest or 'none'}" + (
                " (set training.resume = true to continue from it)" if latest else "")
            run.console.print(f"[red]ray pipeline stopped: {type(exc).__name__}; {where}")
            if isinstance(exc, RayActorError):
                raise RuntimeError(f"a pipeline actor died ({exc.__class__.__name__}); the run stopped; {where}") from exc
            raise
        finally:
            if self.manager is not None:
                try:
                    ray.get(self.manager.close.remote(), timeout=30)
                except Exception:
                    pass
            _kill(self.actors)
        return self._wrap_up(result, summary, stats, trained, skipped_idx)

    def _train(self, stop_after_steps: Optional[int]):
        run, config = self.run, self.run.config
        tr, dp = config.training, config.training.num_gpus
        # ---- trainers first: a resumed run continues from their checkpoint's data position
        trainer_cls = ray.remote(TrainerActor)
        trainers = [trainer_cls.options(**o, name=f"{self.run_id}/trainer-{r}").remote(r, dp)
                    for r, o in enumerate(self.placement.trainer_options)]
        self.actors += trainers
        master = ray.get(trainers[0].address.remote())
        # training.eval_every: the held-out samples follow the usable ones in the engines' list
        held = (HeldOutPlan(run.usable, run.held_out, dp, chain_prompts(run))
                if tr.eval_every and run.held_out else None)
        usable_ref = ray.put(held.samples if held is not None else run.usable)
        setups = [t.setup.remote(config, self.info, str(run.vocab_path), run.total_steps, master, self.handle,
                                 usable_ref if self.from_cache else None) for t in trainers]
        engines_ready = None
        if not self.from_cache:  # engines load the target while trainers build the draft
            inf = config.inference
            self.manager = ray.remote(InferenceManager).options(num_cpus=0, max_concurrency=4).remote(
                EngineActor, self.placement.engine_options, (config, usable_ref, self.handle, self.run_id),
                batch_size=inf.batch_size, max_inflight_per_engine=inf.max_inflight_per_engine,
                max_restarts=inf.max_restarts, name_prefix=f"{self.run_id}/",
            )
            self.actors.append(self.manager)
            engines_ready = self.manager.ready.remote()
        starts = ray.get(setups)
        start = starts[0]
        run.resume_at(start["step"], start["data_position"],
                      Path(start["checkpoint"]) if start["checkpoint"] else None)
        run.banner(f"strategy {tr.strategy}" + (", features from the cache (no inference)" if self.from_cache else ""))

        prompts, positions = plan_prompts(run.plan, run.usable, run.start_step)
        budget = run.plan.budget
        rows = None if budget is None else {s: budget.steps[s] for s in range(run.start_step, run.total_steps)}
        controller = ray.remote(ControllerActor).options(num_cpus=0, name=f"{self.run_id}/controller").remote(
            prompts, positions, num_ranks=dp, micro_batch_size=tr.micro_batch_size,
            max_pool_bytes=config.transfer.max_pool_bytes, rows=rows,
        )
        self.actors.insert(0, controller)
        held_ref = None  # the engines' held-out results (None: none, or read from the cache)
        if self.from_cache:
            ray.get(controller.all_cached.remote())  # no inference: every sample is in the cache
            pending: list = []
        else:
            ray.get(engines_ready)
            pending = [self.manager.run.remote(controller)]
            if held is not None:  # their features next to the training stream's (the manager is threaded)
                held_ref = self.manager.held_out.remote(held.prompts().wire())
        manager_ref = pending[0] if pending else None
        shares = [held.rank(r, held_ref) if held is not None else None for r in range(dp)]
        train_refs = [t.run.remote(controller, run.config_toml, stop_after_steps, shares[r])
                      for r, t in enumerate(trainers)]
        pending += train_refs

        # ---- the driver's observers (console and progress, W&B, the recorder) follow rank 0's
        # steps through the controller
        result: dict[str, Any] = {}
        follow = Follow(controller, [*line_observers(run), *run.observers()], run.total_steps)
        follow.start(run.start_step)
        finished = False
        try:
            while any(r in pending for r in train_refs):
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    out = ray.get(ref)  # raises if that actor died or failed: the run stops here
                    if ref is train_refs[0]:
                        result = out
                follow.poll()
            follow.poll()
            finished = bool(result.get("finished"))
        finally:
            follow.end(finished)
        if manager_ref is not None and manager_ref in pending:  # trainers stopped early: stop inference
            ray.get(self.manager.stop.remote())
            ray.get(manager_ref)
        summary = ray.get(controller.summary.remote())
        trained = ray.get(controller.trained_indices.remote())
        skipped_idx = set(ray.get(controller.skipped_indices.remote()))
        stats = {"restarts": 0}
        if self.manager is not None:
            stats = ray.get(self.manager.stats.remote())
            ray.get(self.manager.close.remote())
        if held_ref is not None:  # held-out features no trainer read (the run ended before an estimate)
            self.store.delete(held.keys(self.run_id))
        ray.get([t.close.remote() for t in trainers])
        return result, summary, stats, trained, skipped_idx

    def _wrap_up(self, result: dict, summary: dict, stats: dict, trained: list[int], skipped_idx: set[int]) -> RayRunResult:
        run = self.run
        finished = bool(result.get("finished", False))
        leftover = self.store.count()
        if leftover and finished:
            raise RuntimeError(f"transfer store still holds {leftover} keys at the end of the run")
        run.seen.update(trained)
        # controller view (sample stream of this call): in = trained + skipped (+ not run after a stop)
        ctrl_skipped = summary["skipped"]
        if finished and summary["samples_in"] != summary["trained"] + sum(ctrl_skipped.values()):
            raise RuntimeError(f"controller accounting does not add up: {summary}")
        run.console.print(
            f"controller: {summary['samples_in']} sample visits in (one per sample per epoch) = {summary['trained']} trained + "
            f"{sum(ctrl_skipped.values())} skipped ({', '.join(f'{v} {k}' for k, v in ctrl_skipped.items()) or 'none'})"
            f"; {stats['restarts']} engine restart(s); max pool {summary['max_pool_bytes_seen']} bytes")
        if run.recorder.history:
            run.console.print(data_path_line(run.recorder.history))
        # record view, as in the local pipeline: records never trained, skipped by the controller
        extra: Counter[str] = Counter()
        ray_skipped = len(skipped_idx - run.seen)
        if ray_skipped:
            extra["dropped by the ray pipeline (see controller line)"] = ray_skipped
        # token budget: epoch tails with fewer samples than trainer ranks are not in the plan
        tail = set(run.plan.dropped()) - run.seen - skipped_idx if finished else set()
        if tail:
            extra["token budget: epoch tail with fewer samples than trainer ranks"] = len(tail)
        last_ckpt = Path(result["checkpoint"]) if result.get("checkpoint") else None
        export_dir = Path(result["export"]) if result.get("export") else None
        res = run.finish(int(result.get("step", 0)), last_ckpt, export_dir, extra, not_planned=ray_skipped + len(tail))
        return RayRunResult(**attrs.asdict(res, recurse=False), controller={**summary, **stats})


class Follow:
    """The driver side of the step loop: rank 0's step records, read from the controller, to the
    run's metric observers."""

    def __init__(self, controller: Any, observers: list[Observer], total_steps: int):
        self.controller, self.observers, self.total_steps = controller, observers, total_steps
        self.seen = 0

    def start(self, start_step: int) -> None:
        for o in self.observers:
            o.on_start(start_step, self.total_steps)

    def poll(self) -> None:
        for m in ray.get(self.controller.metrics_since.remote(self.seen)):
            self.seen += 1
            record = StepRecord(int(m["step"]), self.total_steps, m)
            for o in self.observers:
                o.on_step(record)

    def end(self, finished: bool) -> None:
        for o in reversed(self.observers):
            o.on_end(finished)


def data_path_line(history: list[dict[str, float]]) -> str:
    """Where rank 0's time went: waiting for data (pipeline starved) vs the steps themselves.
    The first step is left out: it also waits for the engines' first results."""
    steady = history[1:] or history
    wait = sum(m.get("data_wait_s", 0.0) for m in steady)
    stage = sum(m.get("stage_s", 0.0) for m in steady)
    span = steady[-1]["time"] - history[0]["time"] if len(history) > 1 else 0.0
    share = f" ({wait / span:.0%} of the steady-state wall time)" if span > 0 else ""
    first = 2 if len(history) > 1 else 1
    return (f"data path (rank 0, steps {first}..{len(history)}): waited {wait:.2f} s for batches{share}; "
            f"staging took {stage / len(steady):.3f} s per step on the prefetch thread")
