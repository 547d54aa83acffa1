"""The held-out estimate (``training.eval_every``) on the Ray pipeline.

The driver holds out the same seeded samples as the local pipeline (``Run.load_data``) and
splits them over the trainer ranks (``HeldOutPlan``). Their target features are made once, at
the start, by the inference engines next to the training stream (``InferenceManager.held_out``):
into the transfer store under keys of their own, outside the controller's sample stream and its
accounting. From the feature cache no engine runs: a rank reads its share from the cache.

Each trainer rank runs the local pipeline's ``run.held_out.HeldOut`` observer on its share
(``trainer_observer``): at the first estimate it fetches its features and deletes their keys;
the statistics are summed over ranks, so rank 0's report carries the same ``held_out/<metric>``
values as a local run, and the driver's console line (``run.held_out.HeldOutLine``), W&B and
history read them with the step's other metrics.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import numpy as np

from specforge_core.pipeline.ray.controller import PromptBatch
from specforge_core.pipeline.ray.dispatch import ResultBatch
from specforge_core.pipeline.ray.inference import feature_key


@attrs.frozen
class RankHeldOut:
    """One trainer rank's part of the held-out estimate."""

    indices: list[int]  # into the engines' (and the cache reader's) samples: usable + held out
    seqs: list[int]  # their prompt seqs: negative, apart from the training stream's
    counted: bool  # False: a stand-in copy for a rank with no held-out sample of its own
    chain_prompts: list[list[int]]  # training.eval_chain_prompts (rank 0 runs the chain)
    results: Optional[list] = None  # [ref to the engines' ResultBatch wire]; None: the feature cache


class HeldOutPlan:
    """The driver's side: the samples the engines index (``samples``), each rank's share of the
    held-out ones (round robin; a rank left without one gets a stand-in copy, uncounted, so that
    every rank runs the same forwards) and the prompts that make their features."""

    def __init__(self, usable: list, held_out: list, world: int, chain_prompts: list[list[int]]):
        self.samples = list(usable) + list(held_out)
        self.chain_prompts = chain_prompts
        self.shares: list[tuple[list[int], list[int], bool]] = []
        seq = -1
        for r in range(world):
            mine = list(range(r, len(held_out), world))
            counted = bool(mine)
            mine = mine or [r % len(held_out)]
            self.shares.append(([len(usable) + j for j in mine], list(range(seq, seq - len(mine), -1)), counted))
            seq -= len(mine)

    def prompts(self) -> PromptBatch:
        index = [i for idx, _, _ in self.shares for i in idx]
        seq = [s for _, seqs, _ in self.shares for s in seqs]
        tokens = [self.samples[i].num_tokens for i in index]
        return PromptBatch(*(np.asarray(c, np.int64) for c in (seq, index, tokens)))

    def keys(self, run_id: str) -> list[str]:
        """The store keys the engines write the held-out features under."""
        return [feature_key(run_id, s) for _, seqs, _ in self.shares for s in seqs]

    def rank(self, r: int, results: Any = None) -> RankHeldOut:
        """Rank ``r``'s part; ``results``: the ref of ``InferenceManager.held_out`` (None: cache)."""
        indices, seqs, counted = self.shares[r]
        return RankHeldOut(indices, seqs, counted, self.chain_prompts,
                           None if results is None else [results])  # in a list: resolved when needed


def trainer_observer(share: RankHeldOut, trainer: Any, store: Any, info: Any, vocab: Any, rank: int) -> Any:
    """The ``HeldOut`` observer of one trainer rank: its share's features read from the store
    (and deleted there) at the first estimate; rank 0 also runs the greedy chain if configured."""
    import ray
    import torch

    from specforge_core.run.held_out import Chain, HeldOut
    from specforge_core.training.staging import read_into
    from specforge_core.types import TargetFeatures

    c = trainer.config

    def fresh(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def features() -> list[TargetFeatures]:
        if share.results is None:  # the cache reader's keys are the sample indices
            keys = [str(i) for i in share.indices]
        else:
            made = ResultBatch.from_wire(ray.get(share.results[0]))
            key_of = dict(zip(made.seq.tolist(), made.keys, strict=True))
            keys = [key_of[s] for s in share.seqs]
        # copied into this process (not views of the store's shared memory), kept for every estimate
        feats = [TargetFeatures.from_tensors(f"held-out/{i}", read_into(store, k, fresh))
                 for i, k in zip(share.indices, keys, strict=True)]
        store.delete(keys)  # (the cache keeps its files)
        return feats

    chain = None
    if c.training.eval_chain_prompts:
        from pathlib import Path

        from specforge_core.run.recipe import export_trained

        def export(out: Path) -> Optional[Path]:  # a gather on every rank; rank 0 writes
            return export_trained(trainer, info, vocab, out, rank)

        chain = Chain(trainer, export, Path(c.output_dir) / "held_out_export", str(c.model.target),
                      share.chain_prompts, c.eval.steps, c.eval.max_new_tokens)
    return HeldOut(trainer, features, c.training.eval_every, c.training.micro_batch_size, chain, share.counted)
