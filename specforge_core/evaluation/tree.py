"""Draft trees and how a target verifies them, greedily or by sampling.

A cycle verifies a *tree*: node 0 is the root (the last committed token, whose target output
gives the first check), nodes 1..N are draft tokens, ``parents[i]`` the parent of node i+1 (0 =
the root). A chain of K drafts is the tree with ``parents = [0, 1, ..., K-1]``. The target runs
all N+1 nodes in one forward where a node attends to the committed sequence and its own
ancestors (``ancestor_mask``) at rope position ``base + depth``.

Verification walks from the root:

* **greedy** (temperature 0): move to the child whose token is the target's argmax at the
  current node; stop when none matches. The target's argmax there is the bonus token.
* **sampling** (temperature T > 0), as vLLM (``draft_sample_method = "greedy"``: drafts are the
  draft's deterministic choices, no draft probabilities), SGLang and EAGLE verify: at the current
  node with target distribution p, try the children in order; accept child x with probability
  p(x), else set p(x) = 0, renormalise and try the next; when none is accepted (or the node is a
  leaf) the bonus is sampled from what is left of p. The committed token is then distributed
  exactly as p: speculative sampling does not change the output distribution.

With deterministic drafts the probability that the walk moves to child c is exactly p(c) (the
sequential removals cancel), so the *expected* accepted length of the cycle is known exactly from
the one verification forward: ``E(node) = sum_c p_node(c) * (1 + E(c))`` (``expected_accepted``).
For a chain this is ``sum_k prod_{i<=k} p_i(d_i)``, the ``sum over min(p, q)`` of speculative
sampling with a one-hot draft distribution q.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import attrs
import torch


@attrs.define
class DraftTree:
    tokens: list[int]  # node i+1's token (target vocabulary)
    parents: list[int]  # node i+1's parent node (0 = root); parents[i] <= i

    def __attrs_post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"a draft tree has {len(self.tokens)} tokens but {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not 0 <= p <= i:
                raise ValueError(f"draft tree node {i + 1} has parent {p}: parents must come before their children")

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls([int(t) for t in tokens], list(range(len(tokens))))

    @property
    def size(self) -> int:
        """Nodes including the root."""
        return len(self.tokens) + 1

    def depths(self) -> list[int]:
        """Depth of every node (root 0)."""
        d = [0]
        for p in self.parents:
            d.append(d[p] + 1)
        return d

    def children(self) -> list[list[int]]:
        """Children of every node, in node order (the order verification tries them)."""
        ch: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents):
            ch[p].append(i + 1)
        return ch


def ancestor_mask(tree: DraftTree, width: Optional[int] = None) -> torch.Tensor:
    """[W, W] bool: node i attends to node j iff j is i or an ancestor of i (padding nodes beyond
    the tree see only themselves)."""
    n = tree.size
    w = width or n
    m = torch.eye(w, dtype=torch.bool)
    for i, p in enumerate(tree.parents):
        m[i + 1, :n] |= m[p, :n]
    return m


def walk_greedy(tree: DraftTree, argmax: Sequence[int]) -> tuple[list[int], int]:
    """``(path, bonus)``: the accepted nodes (excluding the root) and the target's token after them,
    given the target's argmax at every node."""
    children = tree.children()
    node, path = 0, []
    while True:
        want = int(argmax[node])
        nxt = next((c for c in children[node] if tree.tokens[c - 1] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def walk_sampled(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """``(path, bonus)`` under speculative sampling; ``probs`` [nodes, V] = the target's tempered
    distribution at every node (float64 on CPU)."""
    children = tree.children()
    node, path = 0, []
    while True:
        p = probs[node].clone()
        moved = None
        for c in children[node]:
            x = tree.tokens[c - 1]
            px = float(p[x])
            if px > 0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < px:
                moved = c
                break
            p[x] = 0.0
            total = float(p.sum())
            if total <= 0:  # every token of p was a rejected child (p had tiny support)
                p = probs[node].clone()
                break
            p /= total
        if moved is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(moved)
        node = moved


def expected_accepted(tree: DraftTree, probs: torch.Tensor) -> float:
    """Expected drafts accepted by ``walk_sampled`` (untruncated), exactly: the walk moves to child c
    with probability p(c)."""
    children = tree.children()
    e = [0.0] * tree.size
    for node in reversed(range(tree.size)):
        e[node] = sum(float(probs[node, tree.tokens[c - 1]]) * (1.0 + e[c]) for c in children[node])
    return e[0]


@attrs.frozen
class TreeSpec:
    """A dynamic draft tree (EAGLE-2/3, SGLang ``--speculative-eagle-topk > 1``): ``topk`` children
    per expanded node, ``depth`` levels (SGLang ``--speculative-num-steps``), ``tokens`` nodes
    verified per cycle including the root (SGLang ``--speculative-num-draft-tokens``)."""

    topk: int
    depth: int
    tokens: int

    def __attrs_post_init__(self) -> None:
        if self.topk < 1 or self.depth < 1 or self.tokens < 2:
            raise ValueError(f"tree topk={self.topk}, depth={self.depth}, tokens={self.tokens}: need topk >= 1, "
                             "depth >= 1, tokens >= 2")
        most = self.topk + (self.depth - 1) * self.topk ** 2  # candidates the expansion scores
        if self.tokens - 1 > most:
            raise ValueError(f"tree tokens={self.tokens}: topk={self.topk} and depth={self.depth} score only "
                             f"{most} candidates, so at most tokens={most + 1}")

    @classmethod
    def parse(cls, text: str) -> TreeSpec:
        """``"topk=8,depth=6,tokens=64"``."""
        allowed = ("topk", "depth", "tokens")
        values: dict[str, int] = {}
        for part in filter(None, (s.strip() for s in text.split(","))):
            key, eq, value = part.partition("=")
            if not eq or key.strip() not in allowed:
                raise ValueError(f"--tree {text!r}: '{part}' is not KEY=VALUE with KEY in {', '.join(allowed)}")
            try:
                values[key.strip()] = int(value)
            except ValueError:
                raise ValueError(f"--tree {text!r}: {key.strip()} = {value!r} is not an integer") from None
        missing = [k for k in allowed if k not in values]
        if missing:
            raise ValueError(f"--tree {text!r}: missing {', '.join(missing)} (e.g. topk=8,depth=6,tokens=64)")
        return cls(**values)

    def __str__(self) -> str:
        return f"topk={self.topk},depth={self.depth},tokens={self.tokens}"
