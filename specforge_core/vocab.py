"""The EAGLE-3 draft vocabulary: the most frequent target tokens in the training targets.

Stored the way SGLang and vLLM read it (safetensors, next to the draft weights):

- ``d2t``: int64 [draft_vocab]; target id of draft id ``i`` is ``i + d2t[i]``.
- ``t2d``: bool [target_vocab]; True at target ids that are in the draft vocab.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

import attrs
import torch

log = logging.getLogger(__name__)


@attrs.define
class VocabMapping:
    d2t: torch.Tensor  # int64 [Vd]
    t2d: torch.Tensor  # bool [V_target]

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.numel())

    @property
    def target_vocab_size(self) -> int:
        return int(self.t2d.numel())

    @property
    def draft_to_target_ids(self) -> torch.Tensor:
        """int64 [Vd]: the target id of each draft id (ascending)."""
        return torch.arange(self.draft_vocab_size, dtype=torch.int64) + self.d2t

    @classmethod
    def from_target_ids(cls, used: torch.Tensor, target_vocab_size: int) -> VocabMapping:
        used = torch.as_tensor(used, dtype=torch.int64).sort().values
        t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
        t2d[used] = True
        return cls(d2t=used - torch.arange(used.numel(), dtype=torch.int64), t2d=t2d)

    def validate(self) -> None:
        ids = self.draft_to_target_ids
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.target_vocab_size):
            raise ValueError("vocab mapping: d2t points outside the target vocab")
        if not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("vocab mapping: draft ids must map to strictly ascending target ids")
        expect = torch.zeros_like(self.t2d)
        expect[ids] = True
        if not torch.equal(expect, self.t2d):
            raise ValueError("vocab mapping: t2d does not mark exactly the ids d2t maps to")

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()}, str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VocabMapping:
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot read vocab mapping (expected safetensors with d2t, t2d): {e}") from e
        missing = {"d2t", "t2d"} - set(t)
        if missing:
            raise ValueError(f"{path}: vocab mapping lacks tensors {sorted(missing)} (has {sorted(t)})")
        m = cls(d2t=t["d2t"].to(torch.int64), t2d=t["t2d"].to(torch.bool))
        m.validate()
        return m


def count_loss_tokens(samples: Iterable, target_vocab_size: int) -> torch.Tensor:
    """int64 [V_target]: how often each target id appears at loss-masked positions."""
    parts = []
    for s in samples:
        ids = s.input_ids[s.loss_mask.bool()]
        if ids.numel() and int(ids.max()) >= target_vocab_size:
            raise ValueError(
                f"sample {s.sample_id}: token id {int(ids.max())} >= target vocab size {target_vocab_size}"
            )
        parts.append(ids)
    # one bincount over all loss tokens: a vocab-sized sum per sample took minutes on large datasets
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return torch.bincount(ids.to(torch.int64), minlength=target_vocab_size)


def build_vocab_mapping(samples: Iterable, target_vocab_size: int, draft_vocab_size: int) -> VocabMapping:
    """Keep the ``draft_vocab_size`` most frequent loss-masked target ids (ties: smaller id first);
    if fewer distinct ids were seen, pad with unseen ids, smallest first; sort ascending."""
    if draft_vocab_size > target_vocab_size:
        raise ValueError(
            f"draft_vocab_size {draft_vocab_size} > target vocab size {target_vocab_size}; "
            "set model.draft_vocab_size to at most the target's vocab size"
        )
    if draft_vocab_size <= 0:
        raise ValueError(f"draft_vocab_size must be positive, got {draft_vocab_size}")
    counts = count_loss_tokens(samples, target_vocab_size)
    # Stable sort by descending count keeps ascending id order among equal counts, so unseen ids
    # (count 0) come after every seen id, smallest first: ties and padding in one rule.
    order = torch.sort(-counts, stable=True).indices
    used = order[:draft_vocab_size]
    seen = int((counts > 0).sum())
    if seen < draft_vocab_size:
        log.info("vocab mapping: %d distinct loss tokens < draft vocab %d; padded with unseen ids",
                 seen, draft_vocab_size)
    total = int(counts.sum())
    if total:
        covered = int(counts[used].sum())
        log.info("vocab mapping covers %.2f%% of %d loss tokens", 100.0 * covered / total, total)
    return VocabMapping.from_target_ids(used, target_vocab_size)


def target_vocab_size_of(model_path: str, tokenizer=None, trust_remote_code: bool = False) -> int:
    """The target's embedding rows (config.vocab_size), which can exceed len(tokenizer)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(text_cfg.vocab_size)
    except (OSError, ValueError, AttributeError):
        if tokenizer is None:
            raise
        return len(tokenizer)


def build_vocab_for_config(cfg, out_path: Optional[str | Path] = None) -> Path:
    """``specforge vocab``: tokenize cfg.dataset with the target tokenizer, write the mapping.

    Default output: ``<run.output_dir>/vocab_mapping.safetensors``."""
    from specforge_core.data import build_samples, load_tokenizer

    if not cfg.model.target:
        raise ValueError("model.target is empty: the vocab mapping needs the target's tokenizer")
    tokenizer = load_tokenizer(cfg.model.target, trust_remote_code=cfg.model.trust_remote_code)
    # tokenizing all of a large dataset takes minutes: a bar (stderr) shows how far it is
    samples, stats = build_samples(cfg.dataset, tokenizer, progress=cfg.logging.progress)
    log.info("vocab mapping from %s", stats.summary())
    vocab = target_vocab_size_of(cfg.model.target, tokenizer, cfg.model.trust_remote_code)
    mapping = build_vocab_mapping(samples, vocab, cfg.model.draft_vocab_size)
    out = Path(out_path) if out_path is not None else Path(cfg.output_dir) / "vocab_mapping.safetensors"
    return mapping.save(out)
