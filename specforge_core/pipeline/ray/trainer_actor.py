"""One trainer rank as a Ray actor: joins the process group, builds the ``Trainer`` and runs the
run's step loop (``run.loop.StepLoop``) over a batch source fed by the controller.

``ControllerFeed`` is that source: a background thread pulls this rank's assignments from the
controller, stages each micro-batch on the device (``training.staging``: pinned reads, copies on a
side stream, collation on the GPU), so the training thread only computes. Each step's metrics carry
``data_wait_s`` (the training thread idle, waiting for its next batch) and ``stage_s`` (the
prefetch thread's time for that step).

The controller says *which* samples (store keys) form this rank's micro-batches; the feed reads
them (``get``), deletes them right away (``delete``: the store only holds what is not yet fetched)
and tells the controller (``consumed``: frees pool bytes, resumes inference under backpressure).
A run from the feature cache reads the same assignments from the cache instead (``CacheReader``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from specforge_core.build import create
from specforge_core.components import capability
from specforge_core.distributed import destroy, free_port, init_process_group
from specforge_core.pipeline.ray.dispatch import RankWork, Result
from specforge_core.pipeline.ray.held_out import RankHeldOut, trainer_observer
from specforge_core.registry import get_registry
from specforge_core.run.loop import StepBatch, StepLoop
from specforge_core.run.observers import Observer, StepRecord
from specforge_core.run.recipe import TrainerObservers, export_trained
from specforge_core.training import checkpoint as ckpt
from specforge_core.training.staging import BatchStager, StagedBatch
from specforge_core.training.trainer import Trainer
from specforge_core.vocab import VocabMapping

_END = object()


class CacheReader:
    """The trainer's store in a run from the feature cache (a store that supplies features): a
    key is the sample's dataset index, its features are read from the cache; nothing to delete."""

    def __init__(self, backend: Any, samples: list):
        self.backend, self.samples = backend, samples

    def get(self, key: str, device: Any = None) -> dict[str, torch.Tensor]:
        return self.backend.generate([self.samples[int(key)]])[0].tensors()

    def delete(self, keys: list[str]) -> None:
        pass  # the cache outlives the run

    def close(self) -> None:
        self.backend.close()


class ControllerFeed:
    """The batch source of a Ray trainer rank (see the module doc)."""

    def __init__(self, rank: int, controller: Any, store: Any, stager: BatchStager, prefetch_steps: int):
        self.rank, self.controller, self.store, self.stager = rank, controller, store, stager
        self.ready: queue.Queue = queue.Queue(maxsize=prefetch_steps)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acks: list[int] = []  # fetched and deleted seqs not yet sent
        self.trained_seq: list[int] = []
        self.trained_index: list[int] = []
        self.exhausted = False
        self.thread = threading.Thread(target=self._prefetch, daemon=True)

    # ---------------------------------------------------------------------------- training side
    def __iter__(self) -> Iterator[StepBatch]:
        self.thread.start()
        while True:
            t_wait = time.perf_counter()
            item = self._next()
            wait_s = time.perf_counter() - t_wait  # the training thread idle, waiting for data
            if item is _END:
                self.exhausted = True
                return
            if isinstance(item, BaseException):
                raise item
            _step, position, micro_results, micro, (stage_s, read_s) = item
            if not micro:  # every sample of this step was skipped
                continue
            yield StepBatch(micro, position, {"data_wait_s": wait_s, "stage_s": stage_s, "stage_read_s": read_s},
                            tag=micro_results)

    def trained(self, batch: StepBatch) -> None:
        with self.lock:  # acknowledged on the next pull (or the final ack)
            self.trained_seq.extend(r.seq for mb in batch.tag for r in mb)
            self.trained_index.extend(r.index for mb in batch.tag for r in mb)

    def close(self) -> None:
        """Stop the prefetch thread and send the last acks."""
        self.stop.set()
        if self.exhausted:
            self.thread.join(timeout=5.0)  # its last pull returned None: no acks race with the final one
        ray.get(self.controller.ack.remote(*self._take_acks()))

    def _next(self) -> Any:
        """The next prefetched step; an error (never a hang) if the prefetch thread is gone."""
        while True:
            try:
                return self.ready.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    try:  # it may have put its last item just before ending
                        return self.ready.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("trainer: the prefetch thread ended without a result") from None

    # ---------------------------------------------------------------------------- prefetch thread
    def _take_acks(self) -> tuple[list[int], list[int], list[int]]:
        """(consumed seqs, trained seqs, trained dataset indices) not yet sent."""
        with self.lock:
            acks, self.acks = self.acks, []
            tseq, self.trained_seq = self.trained_seq, []
            tidx, self.trained_index = self.trained_index, []
        return acks, tseq, tidx

    def _fetch(self, micro_results: list[list[Result]]) -> tuple[list[StagedBatch], tuple[float, float]]:
        """Stage this step's micro-batches on the device; delete their keys. Returns the staged
        batches and (seconds it took, seconds of it in store reads; CUDA only) for the metrics."""
        t0, read0 = time.perf_counter(), self.stager.read_s
        micro = [self.stager.stage(self.store, [r.key for r in mb], [str(r.index) for r in mb])
                 for mb in micro_results]
        self.store.delete([r.key for mb in micro_results for r in mb])
        with self.lock:
            self.acks.extend(r.seq for mb in micro_results for r in mb)
        return micro, (time.perf_counter() - t0, self.stager.read_s - read0)

    def _prefetch(self) -> None:
        try:
            if self.stager.cuda and self.stager.device.index is not None:
                torch.cuda.set_device(self.stager.device)  # this thread's current device
            while not self.stop.is_set():
                # acks (fetched+deleted keys, trained samples) ride on the next pull, as columns:
                # one controller call per step, the whole step's assignment in its reply
                consumed, tseq, tidx = self._take_acks()
                wire = ray.get(self.controller.pull.remote(
                    self.rank, 1, 1.0, consumed=consumed, trained_seq=tseq, trained_index=tidx))
                if wire is None:
                    break
                work = RankWork.from_wire(wire)
                if work.discard.n:  # rank 0 deletes what a short last micro-step left unused
                    self.store.delete(list(work.discard.keys))
                    with self.lock:
                        self.acks.extend(work.discard.seq.tolist())
                for step, micro_results, position in work.assignments():
                    # blocks when `prefetch_steps` are ready
                    self.ready.put((step, position, micro_results, *self._fetch(micro_results)))
        except BaseException as exc:  # surfaced by the training loop
            self.ready.put(exc)
            return
        self.ready.put(_END)


class Report(Observer):
    """Rank 0's step metrics to the controller (the driver's console and W&B read them there)."""

    def __init__(self, controller: Any):
        self.controller = controller

    def on_step(self, record: StepRecord) -> None:
        record.metrics["time"] = time.time()  # wall clock at the end of the step (throughput)
        self.controller.report.remote(record.metrics)


class TrainerActor:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.trainer: Any = None

    def address(self) -> tuple[str, int]:
        """Rendezvous address if this actor is rank 0: this node's IP and a free port."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port("0.0.0.0" if not ip.startswith("127.") else ip)

    def setup(self, config: Any, info: Any, vocab_path: str, total_steps: int, master: tuple[str, int],
              store_handle: Any, cached_samples: Optional[list] = None) -> dict[str, Any]:
        """Join the group, build the trainer, load the newest checkpoint if ``training.resume``.
        ``cached_samples``: the run's samples when it trains from the feature cache (keys are their
        indices). Returns ``{"step", "data_position", "checkpoint"}`` (where the run continues from)."""
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.config, self.info, self.vocab_path = config, info, vocab_path
        # a strategy may need a process group even for one rank (its factory says so)
        factory = get_registry().get("training_strategy", config.training.strategy).factory
        if self.world_size > 1 or capability(factory, "ComponentFactory.needs_process_group"):
            init_process_group("auto", self.rank, self.world_size, master[0], master[1])
        self.vocab = VocabMapping.load(vocab_path)
        strategy = create(config, "training_strategy", config)
        self.trainer = Trainer(config, info, self.vocab, total_steps, strategy)
        provider = create(config, "transfer_store")
        if cached_samples is not None:
            self.store = CacheReader(provider.feature_source(config), cached_samples)
        else:
            self.store = provider.connect(store_handle)
        tr = config.training
        # token budget: every micro-batch is the plan's micro_batch_size rows (one shape)
        self.stager = BatchStager(self.trainer.device, self.trainer.dtype, pack_tokens=tr.pack_tokens,
                                  pack_rows=tr.micro_batch_size if tr.token_budget else 0)
        out = {"step": 0, "data_position": None, "checkpoint": None}
        if tr.resume:
            latest = ckpt.latest_checkpoint(config.output_dir)
            if latest is not None:
                extra = ckpt.load(self.trainer, latest)
                out = {"step": self.trainer.step, "data_position": extra["data_position"], "checkpoint": str(latest)}
        return out

    def run(self, controller: Any, config_toml: str, stop_after_steps: Optional[int] = None,
            held_out: Optional[RankHeldOut] = None) -> dict[str, Any]:
        """The step loop of this rank; rank 0 also reports metrics and writes the export.
        ``held_out``: this rank's part of the held-out estimate (``training.eval_every``)."""
        config, t = self.config, self.trainer
        out_dir = Path(config.output_dir)

        def save(position: Optional[dict]) -> Path:
            return ckpt.save(t, out_dir, data_position=position, config_toml=config_toml,
                             vocab_path=self.vocab_path, keep=config.training.keep_checkpoints)

        feed = ControllerFeed(self.rank, controller, self.store, self.stager, config.transfer.prefetch_steps)
        near = TrainerObservers.build(config, t, save, None, self.rank, stop_after_steps)
        observers = ([Report(controller)] if self.rank == 0 else []) + near.all()
        if held_out is not None:  # before the report: it adds the held-out metrics to the record
            observers.insert(0, trainer_observer(held_out, t, self.store, self.info, self.vocab, self.rank))
        try:
            StepLoop(t, feed, observers).run()
        finally:
            feed.close()
        last = str(near.checkpoints.last) if near.checkpoints.last else None
        if not feed.exhausted:  # stopped early (stop_after_steps): no export
            return {"checkpoint": last, "export": None, "step": t.step, "finished": False}
        # export: gather the full draft (collective), rank 0 writes it
        export = export_trained(t, self.info, self.vocab, out_dir / "export", self.rank)
        ray.get(controller.summary.remote())  # the last trained/report calls have landed (actor FIFO)
        return {"checkpoint": last, "export": str(export) if export else None, "step": t.step, "finished": True}

    def close(self) -> None:
        import torch.distributed as dist

        self.store.close()
        if dist.is_initialized():
            destroy()
