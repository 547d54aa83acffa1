"""One trainer rank as a Ray actor: joins the process group, fetches its batches from the transfer
store on a background thread, and runs the same ``Trainer`` step as the local pipeline.

The background thread stages each micro-batch on the device (``training.staging``: pinned reads,
copies on a side stream, collation on the GPU), so the training thread only computes. Each step's
metrics carry ``data_wait_s`` (the training thread idle, waiting for its next batch) and ``stage_s``
(the prefetch thread's time for that step).

The controller says *which* samples (store keys) form this rank's micro-batches; this actor reads
them (``get``), deletes them right away (``delete``: the store only holds what is not yet fetched)
and tells the controller (``consumed``: frees pool bytes, resumes inference under backpressure).
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, Optional

from specforge_core.pipeline.ray.dispatch import RankWork, Result
from specforge_core.training.staging import BatchStager, StagedBatch

_END = object()


class TrainerActor:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.trainer: Any = None

    def address(self) -> tuple[str, int]:
        """Rendezvous address if this actor is rank 0: this node's IP and a free port."""
        import ray

        from specforge_core.distributed import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port("0.0.0.0" if not ip.startswith("127.") else ip)

    def setup(
        self, config: Any, info: Any, vocab_path: str, total_steps: int, master: tuple[str, int],
        store_handle: Any,
    ) -> dict[str, Any]:
        """Join the group, build the trainer, load the newest checkpoint if ``training.resume``.
        Returns ``{"step", "data_position", "checkpoint"}`` (where the run continues from)."""
        import torch

        from specforge_core.distributed import init_process_group
        from specforge_core.registry import get_registry
        from specforge_core.training import checkpoint as ckpt
        from specforge_core.training.components import create
        from specforge_core.training.trainer import Trainer
        from specforge_core.vocab import VocabMapping

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.config, self.info = config, info
        self.vocab_path = vocab_path
        # a strategy may need a process group even for one rank (its factory says so)
        factory = get_registry().get("training_strategy", config.training.strategy).factory
        if self.world_size > 1 or getattr(factory, "needs_process_group", False):
            init_process_group("auto", self.rank, self.world_size, master[0], master[1])
        self.vocab = VocabMapping.load(vocab_path)
        strategy = create(config, "training_strategy", config)
        self.trainer = Trainer(config, info, self.vocab, total_steps, strategy)
        self.store = create(config, "transfer_store").connect(store_handle)
        tr = self.trainer.config.training
        # token budget: every micro-batch is the plan's micro_batch_size rows (one shape)
        self.stager = BatchStager(self.trainer.device, self.trainer.dtype, pack_tokens=tr.pack_tokens,
                                  pack_rows=tr.micro_batch_size if tr.token_budget else 0)
        out = {"step": 0, "data_position": None, "checkpoint": None}
        if config.training.resume:
            latest = ckpt.latest_checkpoint(config.output_dir)
            if latest is not None:
                extra = ckpt.load(self.trainer, latest)
                out = {"step": self.trainer.step, "data_position": extra["data_position"], "checkpoint": str(latest)}
        return out

    # ------------------------------------------------------------------------------ fetching
    def _fetch(self, micro_results: list[list[Result]]) -> tuple[list[StagedBatch], tuple[float, float]]:
        """Stage this step's micro-batches on the device; delete their keys. Returns the staged
        batches and (seconds it took, seconds of it in store reads; CUDA only) for the metrics."""
        t0, read0 = time.perf_counter(), self.stager.read_s
        micro = [self.stager.stage(self.store, [r.key for r in mb], [str(r.index) for r in mb])
                 for mb in micro_results]
        self.store.delete([r.key for mb in micro_results for r in mb])
        with self._lock:
            self._acks.extend(r.seq for mb in micro_results for r in mb)
        return micro, (time.perf_counter() - t0, self.stager.read_s - read0)

    def _take_acks(self) -> tuple[list[int], list[int], list[int]]:
        """(consumed seqs, trained seqs, trained dataset indices) not yet sent."""
        with self._lock:
            acks, self._acks = self._acks, []
            tseq, self._trained_seq = self._trained_seq, []
            tidx, self._trained_index = self._trained_index, []
        return acks, tseq, tidx

    def _prefetch(self, controller: Any, out: queue.Queue, stop: threading.Event) -> None:
        import ray
        import torch

        try:
            if self.stager.cuda and self.stager.device.index is not None:
                torch.cuda.set_device(self.stager.device)  # this thread's current device
            while not stop.is_set():
                # acks (fetched+deleted keys, trained samples) ride on the next pull, as columns:
                # one controller call per step, the whole step's assignment in its reply
                consumed, tseq, tidx = self._take_acks()
                wire = ray.get(controller.pull.remote(
                    self.rank, 1, 1.0, consumed=consumed, trained_seq=tseq, trained_index=tidx))
                if wire is None:
                    break
                work = RankWork.from_wire(wire)
                if work.discard.n:  # rank 0 deletes what a short last micro-step left unused
                    self.store.delete(list(work.discard.keys))
                    with self._lock:
                        self._acks.extend(work.discard.seq.tolist())
                for step, micro_results, position in work.assignments():
                    # blocks when `prefetch_steps` are ready
                    out.put((step, position, micro_results, *self._fetch(micro_results)))
        except BaseException as exc:  # surfaced by the training loop
            out.put(exc)
            return
        out.put(_END)

    @staticmethod
    def _next(ready: queue.Queue, thread: threading.Thread) -> Any:
        """The next prefetched step; an error (never a hang) if the prefetch thread is gone."""
        while True:
            try:
                return ready.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive():
                    try:  # it may have put its last item just before ending
                        return ready.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("trainer: the prefetch thread ended without a result") from None

    # ------------------------------------------------------------------------------ training
    def run(self, controller: Any, config_toml: str, stop_after_steps: Optional[int] = None) -> dict[str, Any]:
        import ray

        from specforge_core.export import export_draft
        from specforge_core.training import checkpoint as ckpt

        tr, t = self.config.training, self.trainer
        out_dir = Path(self.config.output_dir)
        ready: queue.Queue = queue.Queue(maxsize=self.config.transfer.prefetch_steps)
        stop = threading.Event()
        self._acks: list[int] = []
        self._trained_seq: list[int] = []
        self._trained_index: list[int] = []
        self._lock = threading.Lock()
        thread = threading.Thread(target=self._prefetch, args=(controller, ready, stop), daemon=True)
        thread.start()
        history: list[dict[str, float]] = []
        last_ckpt: Optional[str] = None
        position: Optional[dict] = None
        steps_run = 0

        def save() -> str:
            return str(ckpt.save(t, out_dir, data_position=position, config_toml=config_toml,
                                 vocab_path=self.vocab_path, keep=tr.keep_checkpoints))

        try:
            while True:
                t_wait = time.perf_counter()
                item = self._next(ready, thread)
                wait_s = time.perf_counter() - t_wait  # the training thread idle, waiting for data
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                _step, position, micro_results, micro, (stage_s, read_s) = item
                if not micro:  # every sample of this step was skipped
                    continue
                metrics = t.train_step(micro)
                steps_run += 1
                with self._lock:  # acknowledged on the next pull (or the final ack below)
                    self._trained_seq.extend(r.seq for mb in micro_results for r in mb)
                    self._trained_index.extend(r.index for mb in micro_results for r in mb)
                metrics.update(data_wait_s=wait_s, stage_s=stage_s, stage_read_s=read_s)
                if self.rank == 0:
                    metrics["time"] = time.time()  # wall clock at the end of the step (throughput)
                    history.append(metrics)
                    controller.report.remote(metrics)
                if tr.save_every and t.step % tr.save_every == 0:
                    last_ckpt = save()
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    stop.set()
                    ray.get(controller.ack.remote(*self._take_acks()))
                    return {"history": history, "checkpoint": last_ckpt, "export": None, "step": t.step,
                            "finished": False}
        finally:
            stop.set()
        thread.join(timeout=5.0)  # its last pull returned None: no acks race with the final one
        ray.get(controller.ack.remote(*self._take_acks()))
        if position is not None and (last_ckpt is None or Path(last_ckpt) != ckpt.checkpoint_dir(out_dir, t.step)):
            last_ckpt = save()
        # export: gather the full draft (collective), rank 0 writes it
        state = t.strategy.full_state_dict(t.model)
        export = None
        if self.rank == 0:
            export = str(export_draft(self._full_draft(state), self.vocab, out_dir / "export", t.algorithm))
        t.strategy.barrier()
        ray.get(controller.summary.remote())  # the last trained/report calls have landed (actor FIFO)
        return {"history": history, "checkpoint": last_ckpt, "export": export, "step": t.step, "finished": True}

    def _full_draft(self, state: dict) -> Any:
        """An unsharded draft with the trained weights (the strategy's model may be sharded)."""
        if self.trainer.strategy.world_size == 1 and not self.trainer.wrapped:
            return self.trainer.draft
        draft = self.trainer.algorithm.build(self.info, self.vocab)
        state = {k.removeprefix("draft."): v for k, v in state.items()}  # trainer.DraftStep's prefix
        missing, unexpected = draft.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"export: unexpected keys in the gathered state: {unexpected}")
        return draft

    def close(self) -> None:
        import torch.distributed as dist

        from specforge_core.distributed import destroy

        if dist.is_initialized():
            destroy()
