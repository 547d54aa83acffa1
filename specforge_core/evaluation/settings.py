"""``EvalSettings``: everything one evaluation needs, typed, in one object.

The CLI builds it from a run config's ``[eval]`` section (and the model/dataset fields eval
reads) with flags on top (``from_config``, then ``attrs.evolve``); the Python API takes the same
fields as keyword arguments (``evaluate(draft, target, prompts, **fields)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import attrs

from specforge_core.evaluation.tree import TreeSpec

ENGINE_DTYPES = ("fp32", "bf16", "fp16", "fp64")


def _positive(_inst, attr, value) -> None:
    if value is not None and value < 1:
        raise ValueError(f"eval {attr.name} = {value}: must be >= 1")


def _tree(value: Any) -> Optional[TreeSpec]:
    if value is None or value == "" or isinstance(value, TreeSpec):
        return value or None
    if isinstance(value, str):
        return TreeSpec.parse(value)
    if isinstance(value, dict):
        return TreeSpec(**value)
    raise ValueError(f"eval tree = {value!r}: give 'topk=8,depth=6,tokens=64' or a TreeSpec")


@attrs.define(kw_only=True)
class EvalSettings:
    draft: str  # exported draft directory
    target: str  # target model directory or hub id
    prompts: Any  # prompt files, ``data.Prompt`` objects, or token-id lists
    steps: int = attrs.field(default=3, validator=_positive)  # chain: K drafts per cycle
    tree: Optional[TreeSpec] = attrs.field(default=None, converter=_tree)  # a tree instead of a chain
    temperature: float = 0.0  # 0 = greedy; > 0 = speculative sampling
    seed: int = 0  # sampling at temperature > 0
    max_new_tokens: int = attrs.field(default=128, validator=_positive)
    max_prompts: Optional[int] = attrs.field(default=None, validator=_positive)
    fast: bool = False  # teacher-forced counts (chain, temperature 0, hf engine)
    check: bool = True  # greedy: compare with plain greedy decoding
    aux_layers: Optional[list[int]] = None  # HF hidden_states indices (None: the export's / default)
    eos_ids: Optional[list[int]] = None  # None: the target's; [] disables EOS
    device: Optional[str] = None
    dtype: str = attrs.field(default="fp32", validator=attrs.validators.in_(ENGINE_DTYPES))
    chat_template: str = "auto"
    max_seq_length: int = 2048
    reasoning: str = "keep"
    trust_remote_code: bool = False
    progress: bool = False
    batch_size: int = attrs.field(default=16, validator=_positive)
    algorithm: Optional[str] = None  # the draft algorithm whose proposer drafts
    engine: str = "hf"
    engine_python: Optional[str] = None
    speedup: bool = False  # also measure forward costs and estimate tokens/s (``speedup.py``)
    concurrency: list[int] = attrs.field(factory=lambda: [1, 8, 32])

    def __attrs_post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"eval temperature = {self.temperature}: must be >= 0")
        if self.fast and (self.tree is not None or self.temperature > 0):
            raise ValueError("--fast replays greedy chains only: drop it for --tree or --temperature > 0")

    @property
    def depth(self) -> int:
        """Most drafts one cycle can accept (K for a chain, the tree's depth)."""
        return self.tree.depth if self.tree is not None else self.steps

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def shape(self) -> str:
        return f"tree {self.tree}" if self.tree is not None else f"chain K={self.steps}"

    @classmethod
    def from_config(cls, cfg: Any) -> EvalSettings:
        """The settings a run config implies: ``<output_dir>/export``, ``model.target``, ``eval.*``
        (data: ``eval.data``, else ``dataset.path``)."""
        e = cfg.eval
        return cls(
            draft=str(Path(cfg.output_dir) / "export"), target=cfg.model.target,
            prompts=list(e.data) or list(cfg.dataset.path), steps=e.steps, max_new_tokens=e.max_new_tokens,
            max_prompts=e.max_prompts, fast=e.fast, engine=e.engine, engine_python=e.engine_python or None,
            batch_size=e.batch_size, tree=getattr(e, "tree", "") or None,
            temperature=getattr(e, "temperature", 0.0), seed=getattr(e, "seed", 0),
            chat_template=cfg.dataset.chat_template, max_seq_length=cfg.dataset.max_seq_length,
            reasoning=cfg.dataset.reasoning, trust_remote_code=cfg.model.trust_remote_code,
            aux_layers=list(cfg.model.aux_layers) or None, algorithm=cfg.model.draft,
        )
