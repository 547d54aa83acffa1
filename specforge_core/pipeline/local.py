"""``run_local``: the whole run in one process, a thin driver of ``run.recipe.Run``.

data -> vocab mapping -> target backend (in-process) -> transfer store -> trainer -> checkpoints ->
export. Every sample's features go put -> get -> delete through the configured transfer store, so
the local path exercises the same hand-off a disaggregated (Ray) pipeline uses. A store that
supplies features (the disk cache of ``specforge data features``) replaces the target backend.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, Optional

import torch

from specforge_core.build import create
from specforge_core.components import capability
from specforge_core.config.schema import SpecforgeConfig
from specforge_core.run.held_out import observers_for
from specforge_core.run.loop import StepBatch, StepLoop
from specforge_core.run.order import StepPlan
from specforge_core.run.recipe import Run, RunResult, TrainerObservers, export_trained
from specforge_core.training import checkpoint as ckpt
from specforge_core.training.trainer import Trainer
from specforge_core.types import Sample, TargetFeatures

__all__ = ["RunResult", "run_local"]


class InProcessFeatures:
    """The local batch source: the plan's steps from the trainer's step on; each step's samples
    through the target backend and the transfer store (put -> get -> delete)."""

    def __init__(self, run: Run, backend: Any, store: Any, run_id: str, trainer: Trainer):
        self.run, self.backend, self.store, self.run_id, self.trainer = run, backend, store, run_id, trainer

    def __iter__(self) -> Iterator[StepBatch]:
        plan: StepPlan = self.run.plan
        t, tr = self.trainer, self.run.config.training
        for step in plan.walk(t.step):
            feats = self.fetch(step.step, [self.run.usable[i] for i in step.indices])
            if plan.budget is not None:
                micro = plan.budget.micro_batches(step.step, feats, tr.micro_batch_size, tr.pack_tokens,
                                                  t.device, t.dtype)
            else:
                micro = [feats[i : i + tr.micro_batch_size] for i in range(0, len(feats), tr.micro_batch_size)]
            yield StepBatch(micro, step.position, tag=step.indices)

    def fetch(self, step: int, samples: list[Sample]) -> list[TargetFeatures]:
        """Target inference, then every sample through the store: put -> get -> delete."""
        out: list[TargetFeatures] = []
        bs = self.run.config.inference.batch_size
        for start in range(0, len(samples), bs):
            for f in self.backend.generate(samples[start : start + bs]):
                key = f"{self.run_id}/{step}/{f.sample_id}"
                self.store.put(key, f.tensors())
                tensors = self.store.get(key, self.trainer.device)
                self.store.delete([key])
                out.append(TargetFeatures.from_tensors(f.sample_id, tensors, f.category))
        return out

    def trained(self, batch: StepBatch) -> None:
        self.run.seen.update(batch.tag)


def run_local(
    config: SpecforgeConfig,
    *,
    stop_after_steps: Optional[int] = None,  # end early as if killed (tests of resume)
    console: Any = None,
    target_backend: Any = None,  # a ready-made TargetBackend (the caller closes it)
    transfer_store: Any = None,  # a ready-made TransferStoreProvider
    registry: Any = None,  # the plugin registry to build components with (None: entry points)
) -> RunResult:
    with Run(config, registry=registry, console=console) as run:
        # ---- prepare
        run.claim_output_dir()
        run.write_config()
        run.load_data()
        config, cleanup = run.config, run.cleanup
        provider = transfer_store if transfer_store is not None else create(config, "transfer_store",
                                                                            registry=registry)
        backend = target_backend
        if backend is None and capability(provider, "TransferStoreProvider.supplies_features"):
            # the store serves features written beforehand (`specforge data features`): no target
            backend = provider.feature_source(config)
            cleanup.callback(backend.close)
        if backend is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            backend = create(config, "target_backend", config, device, registry=registry)
            cleanup.callback(backend.close)
        info = backend.info
        run.plan_steps(info.vocab_size)
        trainer = Trainer(config, info, run.vocab, run.total_steps, registry=registry)
        latest = ckpt.latest_checkpoint(run.out_dir, report=lambda m: None) if config.training.resume else None
        extra = ckpt.load(trainer, latest) if latest is not None else {}
        run.resume_at(trainer.step, extra.get("data_position"), latest)
        run.banner(f"device {trainer.device}, dtype {str(trainer.dtype).replace('torch.', '')}")

        run_id = f"{config.run.name}-{uuid.uuid4().hex[:8]}"
        handle = provider.start(run_id)
        cleanup.callback(provider.stop, handle)
        store = provider.connect(handle)
        cleanup.callback(store.close)

        # ---- train
        def save(position: Optional[dict]):
            return ckpt.save(trainer, run.out_dir, data_position=position, config_toml=run.config_toml,
                             vocab_path=str(run.vocab_path), keep=config.training.keep_checkpoints)

        source = InProcessFeatures(run, backend, store, run_id, trainer)
        near = TrainerObservers.build(config, trainer, save, run.plan.position_at(trainer.step),
                                      stop_after_steps=stop_after_steps)
        held_out = observers_for(run, trainer, backend)  # before the observers that read the metrics
        finished = StepLoop(trainer, source, [*held_out, *run.observers(), *near.all()]).run()

        # ---- wrap up
        leftover = store.count()
        if leftover:
            raise RuntimeError(f"transfer store still holds {leftover} keys at the end of the run")
        export_dir = export_trained(trainer, info, run.vocab, run.out_dir / "export") if finished else None
        return run.finish(trainer.step, near.checkpoints.last, export_dir)
