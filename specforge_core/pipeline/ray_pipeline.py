"""``run_ray``: the disaggregated pipeline on Ray.

Same components and TOML as ``run_local`` (data -> vocab -> target -> store -> trainer ->
checkpoint -> export), but target inference and draft training run in separate Ray actors on
separate GPU groups and scale independently::

    driver ── data, vocab, plan ──────────────────────────────────────────────────────────┐
    ControllerActor  (metadata: prompt buffer, result pool, one queue per trainer rank)     │
      ▲ exchange (results in, prompts out,     ▲ pull (a batch of steps per call, carrying  │
      │   failed prompts back: one call)        │   consumed/trained acks) / ack / report     │
    InferenceManager ─ generate(prompts) ─▶ EngineActor x N ── put ─▶ transfer store ─ get ─▶ TrainerActor x dp
                                             (target backend)       (shm / mooncake)       (fsdp2 / local)

See docs/pipeline.md for placement, multi-node use and fault behaviour.
"""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from specforge_core.config.schema import SpecforgeConfig
from specforge_core.pipeline.local import (
    BudgetPlan,
    RunResult,
    SampleOrder,
    _check_budget_position,
    _load_or_build_vocab,
    account,
    format_metrics,
    load_training_samples,
    print_run_end,
)

# environment a worker on another node needs to behave like this driver
_FORWARD_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MC_TCP_BIND_ADDRESS", "TOKENIZERS_PARALLELISM")


@attrs.define
class RayRunResult(RunResult):
    controller: dict[str, Any] = attrs.field(factory=dict)  # the controller's summary + engine stats


def connect_ray(config: SpecforgeConfig) -> bool:
    """Join ``run.ray_address`` / ``$RAY_ADDRESS`` or start a local cluster; True if we started
    (or joined) Ray here and must shut it down at the end."""
    import warnings

    import ray

    from specforge_core.pipeline.ray import leftovers

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


def resolve_store(config: SpecforgeConfig) -> SpecforgeConfig:
    """The Ray pipeline's default store is ``shm`` (one node). The ``local`` store only lives in
    one process, so asking for it explicitly is an error; ``shm`` across nodes is too."""
    import ray

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


def plan_prompts(order: SampleOrder, usable: list, start_step: int, total_steps: int, per_step: int):
    """The run's sample stream from ``order``'s position: prompts tagged with their optimizer
    step, and the data position after each step (what a checkpoint of that step records)."""
    from specforge_core.pipeline.ray.controller import Prompt

    prompts, positions, seq = [], {}, 0
    for step in range(start_step, total_steps):
        for i in order.take(per_step):
            prompts.append(Prompt(seq, i, usable[i].num_tokens, step))
            seq += 1
        positions[step] = order.position()
    return prompts, positions


def plan_budget_prompts(budget: BudgetPlan, usable: list, start_step: int):
    """``plan_prompts`` for ``training.token_budget``: each step's planned samples, in row order."""
    from specforge_core.pipeline.ray.controller import Prompt

    prompts, positions, seq = [], {}, 0
    for step in range(start_step, len(budget.steps)):
        for i in budget.sample_indices(step):
            prompts.append(Prompt(seq, i, usable[i].num_tokens, step))
            seq += 1
        positions[step] = budget.positions[step]
    return prompts, positions


def _kill(actors: list) -> None:
    import ray

    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already dead
            pass


def run_ray(config: SpecforgeConfig, **kwargs: Any) -> RayRunResult:
    """The Ray pipeline (see :func:`_run_ray` for the arguments), holding ``output_dir``'s lock
    throughout; a fresh run refuses another run's checkpoints, a resume checks the config."""
    from rich.console import Console

    from specforge_core import rundir
    from specforge_core.config import dump_toml

    kwargs["console"] = console = kwargs.get("console") or Console(soft_wrap=True)
    with rundir.lock(config.output_dir, warn=console.print):
        rundir.claim(config.output_dir, config.training.resume, config.run.name)
        if config.training.resume:
            rundir.check_resume(config, dump_toml(config), warn=console.print)
        return _run_ray(config, **kwargs)


def _run_ray(
    config: SpecforgeConfig,
    *,
    stop_after_steps: Optional[int] = None,  # trainers end early as if killed (tests of resume)
    console: Any = None,
    target_backend: Any = None,  # not supported: engines build theirs inside Ray actors
    transfer_store: Any = None,  # a ready-made provider of a registered store (actors connect via the registry)
) -> RunResult:
    if target_backend is not None:
        raise ValueError(
            "run.pipeline = 'ray' builds the target backend inside each inference actor from the config; "
            "a ready-made target_backend instance cannot be moved there (use run.pipeline = 'local')"
        )
    import ray
    from rich.console import Console

    from specforge_core.config import dump_toml
    from specforge_core.pipeline.ray import placement as pl
    from specforge_core.pipeline.ray.controller import ControllerActor
    from specforge_core.pipeline.ray.inference import EngineActor, InferenceManager
    from specforge_core.pipeline.ray.trainer_actor import TrainerActor
    from specforge_core.plan import with_aux_layers
    from specforge_core.target import target_info
    from specforge_core.training.components import create

    t0 = time.perf_counter()
    console = console or Console(soft_wrap=True)  # log lines stay whole in files and CI logs
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(config.run.seed)
    torch.manual_seed(config.run.seed)
    tr = config.training
    if tr.token_budget and not tr.pack_tokens:
        raise ValueError("training.token_budget = true needs training.pack_tokens > 0 (the row length, e.g. 8192)")

    # ---- data, target facts (no weights on the driver), vocab: as in the local pipeline
    samples, usable, data_stats, skipped = load_training_samples(config, console)
    # unset model.aux_layers = the draft algorithm's default for this target (config.toml keeps it
    # unset, as the user wrote it); engines, trainers and the export all get this list
    run_model = with_aux_layers(config).model
    info = target_info(config.model.target, run_model.aux_layers, config.model.trust_remote_code)
    # trainer actors load the mapping from this file (a fresh run always rewrites it)
    vocab, vocab_path = _load_or_build_vocab(config, usable, info.vocab_size, console)

    # ---- plan: a step is micro_batch_size x gradient_accumulation samples on each of dp ranks
    dp = tr.num_gpus
    per_step = tr.micro_batch_size * tr.gradient_accumulation * dp
    total_steps = tr.max_steps if tr.max_steps > 0 else tr.num_epochs * math.ceil(len(usable) / per_step)
    order = SampleOrder(len(usable), config.run.seed, config.dataset.shuffle)
    lengths = [s.num_tokens for s in usable]
    budget: Optional[BudgetPlan] = None
    if tr.token_budget:  # every step: per_step rows of pack_tokens, the same plan as the local pipeline's
        budget = BudgetPlan.build(lengths, order, tr.pack_tokens, per_step, tr.num_epochs, tr.max_steps,
                                  min_step_samples=dp)
        total_steps = len(budget.steps)

    started_ray = connect_ray(config)
    config = resolve_store(config)
    config_toml = dump_toml(config)
    (out_dir / "config.toml").write_text(config_toml)
    config = attrs.evolve(config, model=run_model)
    placement = pl.plan_placement(config)
    console.print(f"ray: {placement.describe()}; transfer store '{config.transfer.store}'")

    provider = transfer_store if transfer_store is not None else create(config, "transfer_store")
    if hasattr(provider, "configure"):  # e.g. mooncake sizes its buffers from the model
        provider.configure(info.hidden_size, len(info.aux_layer_ids), config.dataset.max_seq_length,
                           config.transfer.max_pool_bytes, 4 if placement.use_gpu is False else 2)
    run_id = f"{config.run.name}-{uuid.uuid4().hex[:8]}".replace("/", "_")
    handle = provider.start(run_id)
    store = provider.connect(handle)
    actors: list = []
    manager = None
    history: list[dict[str, float]] = []
    result: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    try:
        # ---- trainers first: a resumed run continues from their checkpoint's data position
        trainer_cls = ray.remote(TrainerActor)
        trainers = [trainer_cls.options(**o, name=f"{run_id}/trainer-{r}").remote(r, dp)
                    for r, o in enumerate(placement.trainer_options)]
        actors += trainers
        master = ray.get(trainers[0].address.remote())
        setups = [t.setup.remote(config, info, str(vocab_path), total_steps, master, handle) for t in trainers]
        # engines load the target while trainers build the draft
        inf = config.inference
        manager = ray.remote(InferenceManager).options(num_cpus=0, max_concurrency=4).remote(
            EngineActor, placement.engine_options, (config, ray.put(usable), handle, run_id),
            batch_size=inf.batch_size, max_inflight_per_engine=inf.max_inflight_per_engine,
            max_restarts=inf.max_restarts, name_prefix=f"{run_id}/",
        )
        actors.append(manager)
        engines_ready = manager.ready.remote()
        starts = ray.get(setups)
        start_step, position = starts[0]["step"], starts[0]["data_position"]
        seen: set[int] = set()
        if position is not None:
            if budget is not None:
                _check_budget_position(budget, start_step, position, Path(starts[0]["checkpoint"]))
                seen.update(i for s in range(start_step) for i in budget.sample_indices(s))
            else:
                order.seek(**position)
                seen.update(order.visited_before())
            console.print(f"resumed from {starts[0]['checkpoint']} (step {start_step}, data position {position})")
        if budget is not None:
            prompts, positions = plan_budget_prompts(budget, usable, start_step)
            shape = (f"token budget: {tr.gradient_accumulation} x {tr.micro_batch_size} rows of {tr.pack_tokens} "
                     f"positions per step and rank over {dp} rank(s), "
                     f"{budget.fill(lengths, tr.pack_tokens):.1%} full")
        else:
            prompts, positions = plan_prompts(order, usable, start_step, total_steps, per_step)
            shape = f"{per_step} per step over {dp} rank(s)"
        console.print(
            f"training: {len(usable)} samples, {shape}, {total_steps} steps, "
            f"ttt_length {tr.ttt_length}, strategy {tr.strategy}"
        )
        rows = None if budget is None else {s: budget.steps[s] for s in range(start_step, total_steps)}
        controller = ray.remote(ControllerActor).options(num_cpus=0, name=f"{run_id}/controller").remote(
            prompts, positions, num_ranks=dp, micro_batch_size=tr.micro_batch_size,
            max_pool_bytes=config.transfer.max_pool_bytes, rows=rows,
        )
        actors.insert(0, controller)
        ray.get(engines_ready)
        manager_ref = manager.run.remote(controller)
        train_refs = [t.run.remote(controller, config_toml, stop_after_steps) for t in trainers]
        pending = [manager_ref, *train_refs]
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, disable=not config.logging.progress)  # as the local pipeline's
        with bar:
            task = bar.add_task("train", total=total_steps, completed=start_step)
            while any(r in pending for r in train_refs):
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    out = ray.get(ref)  # raises if that actor died or failed: the run stops here
                    if ref is train_refs[0]:
                        result = out
                for m in ray.get(controller.metrics_since.remote(len(history))):
                    history.append(m)
                    bar.update(task, completed=int(m["step"]))
                    if int(m["step"]) % tr.log_every == 0 or int(m["step"]) == total_steps:
                        bar.console.print(format_metrics(m, total_steps, tr.ttt_length))
        if manager_ref in pending:  # trainers stopped early (stop_after_steps): stop inference
            ray.get(manager.stop.remote())
            ray.get(manager_ref)
        summary = ray.get(controller.summary.remote())
        trained_indices = ray.get(controller.trained_indices.remote())
        skipped_indices = set(ray.get(controller.skipped_indices.remote()))
        stats = ray.get(manager.stats.remote())
        ray.get(manager.close.remote())
        ray.get([t.close.remote() for t in trainers])
    except BaseException as exc:
        from ray.exceptions import RayActorError

        from specforge_core.training import checkpoint as ckpt

        # stop the actors before looking: a trainer still saving would otherwise complete a newer
        # checkpoint after this message named an older one
        _kill(actors)
        latest = ckpt.latest_checkpoint(out_dir)
        where = f"last complete checkpoint: {latest or 'none'}" + (
            " (set training.resume = true to continue from it)" if latest else "")
        console.print(f"[red]ray pipeline stopped: {type(exc).__name__}; {where}")
        if isinstance(exc, RayActorError):
            raise RuntimeError(f"a pipeline actor died ({exc.__class__.__name__}); the run stopped; {where}") from exc
        raise
    finally:
        if manager is not None:
            try:
                ray.get(manager.close.remote(), timeout=30)
            except Exception:
                pass
        _kill(actors)
        leftover = store.count()
        store.close()
        provider.stop(handle)
        pl.remove(placement)
        if started_ray:
            ray.shutdown()
            from specforge_core.pipeline.ray import leftovers

            leftovers.forget()

    finished = result.get("finished", False)
    if leftover and finished:
        raise RuntimeError(f"transfer store still holds {leftover} keys at the end of the run")
    seen.update(trained_indices)
    # controller view (sample stream of this call): in = trained + skipped (+ not run after a stop)
    ctrl_skipped = summary["skipped"]
    stream_line = (
        f"controller: {summary['samples_in']} samples in = {summary['trained']} trained + "
        f"{sum(ctrl_skipped.values())} skipped ({', '.join(f'{v} {k}' for k, v in ctrl_skipped.items()) or 'none'})"
    )
    if finished and summary["samples_in"] != summary["trained"] + sum(ctrl_skipped.values()):
        raise RuntimeError(f"controller accounting does not add up: {summary}")
    console.print(stream_line + f"; {stats['restarts']} engine restart(s); max pool {summary['max_pool_bytes_seen']} bytes")
    if history:
        console.print(data_path_line(history))
    # record view, as in the local pipeline: records never trained, skipped by the controller
    ray_skipped = len(skipped_indices - seen)
    if ray_skipped:
        skipped["dropped by the ray pipeline (see controller line)"] = ray_skipped
    # token budget: epoch tails with fewer samples than trainer ranks are not in the plan
    tail = set(budget.dropped) - seen - skipped_indices if budget is not None and finished else set()
    if tail:
        skipped["token budget: epoch tail with fewer samples than trainer ranks"] = len(tail)
    accounting = account(data_stats, len(samples), skipped, len(usable) - ray_skipped - len(tail), seen)
    last_ckpt = Path(result["checkpoint"]) if result.get("checkpoint") else None
    export_dir = Path(result["export"]) if result.get("export") else None
    wall = print_run_end(console, accounting, last_ckpt, export_dir, t0)
    return RayRunResult(out_dir, int(result.get("step", 0)), history, last_ckpt, export_dir, accounting,
                        wall, controller={**summary, **stats})


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
