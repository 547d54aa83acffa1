"""Speculation, batched over prompts: chains or trees, greedy or sampled.

Two roles, so drafters and tree shapes slot in (see docs/evaluation.md):

* the **proposer** (``components.Proposer``, given by the draft algorithm) owns the draft and its
  state: ``observe`` feeds it newly committed tokens with their target features; ``propose(K)``
  returns a chain of K drafts per row, ``propose_tree(topk, depth, tokens)`` a ``DraftTree``;
* the **verifier** (here: the HF target through ``TargetBatch``) runs each row's last committed
  token plus its draft tree in one batched forward (tree attention mask, rope position = depth),
  walks the tree (``tree.py``: greedy, or speculative sampling at temperature > 0), and keeps only
  the accepted path's entries in its KV cache (the rest become holes).

A chain is the tree whose node i has parent i-1, so one code path verifies both. Indexing: row r
has committed x[0..n]; the target has run x[0..n-1] (features f[0..n-1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import attrs
import torch

from specforge_core.components import has_capability
from specforge_core.evaluation.accounting import truncate_cycle
from specforge_core.evaluation.batch import TargetBatch
from specforge_core.evaluation.target import TargetModel
from specforge_core.evaluation.tree import DraftTree, TreeSpec, expected_accepted, walk_greedy, walk_sampled


@attrs.define
class SpecResult:
    output: list[int]  # generated tokens (first one from the prefill)
    cycles: list[tuple[int, int]]  # (accepted, committed) per verification forward
    matched: list[int]  # untruncated accepted count per cycle (what engines count)
    expected: list[float] = attrs.Factory(list)  # sampling: exact expected accepted drafts per cycle


@attrs.frozen
class Sampling:
    """How the verifier picks tokens: greedy (temperature 0) or speculative sampling."""

    temperature: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def accepted_prefix(drafts: Sequence[int], target_tokens: Sequence[int]) -> int:
    """Number of leading drafts equal to the target's tokens at the same positions."""
    m = 0
    while m < len(drafts) and m < len(target_tokens) and drafts[m] == target_tokens[m]:
        m += 1
    return m


def stop_budget(tokens: Sequence[int], remaining: int, eos: set[int]) -> int:
    """Tokens of ``tokens`` committed before the stop: EOS (kept) or the ``remaining`` budget."""
    for i, t in enumerate(tokens):
        if t in eos:
            return min(remaining, i + 1)
    return remaining


def draft_trees(proposer, steps: int, tree: Optional[TreeSpec]) -> list[DraftTree]:
    """This cycle's drafts of every row, as trees (a chain of ``steps`` when ``tree`` is None)."""
    if tree is None:
        return [DraftTree.chain(d) for d in proposer.propose(steps)]
    if not has_capability(proposer, "Proposer.propose_tree"):
        raise ValueError(f"{type(proposer).__name__} drafts chains only (no propose_tree): this draft "
                         "algorithm cannot be evaluated with a tree")
    return [DraftTree(list(t), list(p)) for t, p in proposer.propose_tree(tree.topk, tree.depth, tree.tokens)]


def speculate_batch(prompts: Sequence[Sequence[int]], proposer, target: TargetModel, steps: int,
                    max_new_tokens: int, eos_ids: Sequence[int] = (), tree: Optional[TreeSpec] = None,
                    sampling: Sampling = Sampling()) -> list[SpecResult]:
    """Speculation for a batch of prompts: one prefill, then per cycle draft / verify all rows in
    one forward / keep the accepted path, until each row hits EOS or ``max_new_tokens``."""
    prompts = [list(p) for p in prompts]
    eos = set(eos_ids)
    gen = None if sampling.greedy else sampling.generator()
    batch = TargetBatch(target)
    logits, feats = batch.prefill(prompts)
    firsts = _pick(logits, sampling, gen)
    proposer.begin(prompts)
    proposer.observe([p[1:] + [f] for p, f in zip(prompts, firsts, strict=True)], feats)
    results = [SpecResult([f], [], []) for f in firsts]
    active = [r for r, res in enumerate(results) if not _done(res, max_new_tokens, eos)]
    _select(batch, proposer, active, len(results))
    while active:
        trees = draft_trees(proposer, steps, tree)
        out, aux, width = batch.append([[results[r].output[-1], *t.tokens] for r, t in zip(active, trees, strict=True)],
                                       parents=[t.parents for t in trees], logits=not sampling.greedy)
        if sampling.greedy:
            argmax = out.tolist()
        else:
            probs = torch.softmax(out.double().cpu() / sampling.temperature, dim=-1)
        paths, tokens, features = [], [], []
        for b, r in enumerate(active):
            res, t = results[r], trees[b]
            if sampling.greedy:
                path, bonus = walk_greedy(t, argmax[b])
            else:
                node_probs = probs[b, : t.size]
                path, bonus = walk_sampled(t, node_probs, gen)
                res.expected.append(expected_accepted(t, node_probs))
            m = len(path)
            new = [t.tokens[i - 1] for i in path] + [bonus]  # accepted drafts + the bonus
            accepted, committed = truncate_cycle(m, stop_budget(new, max_new_tokens - len(res.output), eos))
            res.cycles.append((accepted, committed))
            res.matched.append(m)
            res.output.extend(new[:committed])
            kept = [0, *path]  # target entries of the accepted inputs (root + path)
            paths.append(kept)
            tokens.append(new[:committed])
            features.append(aux[b, kept[:committed]])
        batch.commit_nodes(paths, width)
        proposer.observe(tokens, features)
        still = [b for b, r in enumerate(active) if not _done(results[r], max_new_tokens, eos)]
        if len(still) < len(active):
            batch.keep(still)
            if still:
                proposer.keep(still)
            active = [active[b] for b in still]
    return results


def greedy_batch(prompts: Sequence[Sequence[int]], target: TargetModel, max_new_tokens: int,
                 eos_ids: Sequence[int] = ()) -> list[list[int]]:
    """Plain greedy decoding, one token per row per forward: the reference speculation must equal."""
    eos = set(eos_ids)
    batch = TargetBatch(target)
    logits, _ = batch.prefill([list(p) for p in prompts])
    outs = [[f] for f in _pick(logits, Sampling(), None)]
    active = [r for r, o in enumerate(outs) if len(o) < max_new_tokens and o[-1] not in eos]
    batch.keep(active)
    while active:
        nxt, _, width = batch.append([[outs[r][-1]] for r in active])
        batch.commit([1] * len(active), width)
        for b, r in enumerate(active):
            outs[r].append(int(nxt[b, 0]))
        still = [b for b, r in enumerate(active) if len(outs[r]) < max_new_tokens and outs[r][-1] not in eos]
        if len(still) < len(active):
            batch.keep(still)
            active = [active[b] for b in still]
    return outs


def _pick(last_logits: torch.Tensor, sampling: Sampling, gen: Optional[torch.Generator]) -> list[int]:
    """The prefill's token per row from its last-position logits [B, V]: argmax or a sample."""
    if sampling.greedy:
        return last_logits.argmax(-1).tolist()
    probs = torch.softmax(last_logits.double().cpu() / sampling.temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0].tolist()


def _done(res: SpecResult, max_new_tokens: int, eos: set[int]) -> bool:
    return len(res.output) >= max_new_tokens or res.output[-1] in eos


def _select(batch: TargetBatch, proposer, active: list[int], rows: int) -> None:
    if len(active) < rows:
        batch.keep(active)
        if active:
            proposer.keep(active)
