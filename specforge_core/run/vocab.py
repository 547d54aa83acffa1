"""The run's vocab mapping: ``<output_dir>/vocab_mapping.safetensors``, loaded or computed once per run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from specforge_core.training import checkpoint as ckpt
from specforge_core.types import Sample
from specforge_core.vocab import VocabMapping, build_vocab_mapping


def vocab_mapping_path(config: Any) -> Path:
    return Path(config.output_dir) / "vocab_mapping.safetensors"


def load_or_build_vocab(config: Any, samples: Sequence[Sample], target_vocab: int,
                        console: Any) -> tuple[VocabMapping, Path]:
    """The mapping this run trains with, and the file it lives in (trainer processes load it).

    Resume: the mapping the checkpoint was trained with; else ``model.vocab_mapping``; else the
    run dir's file of an earlier resumed run; else computed from ``samples``."""
    path = vocab_mapping_path(config)
    trained = _resumed_vocab(config)
    if trained is not None:  # resume: the mapping the checkpoint's weights were trained with
        vocab, source = trained, f"{path} (resume)"
        if not path.exists() or not torch.equal(VocabMapping.load(str(path)).d2t, vocab.d2t):
            console.print(f"vocab mapping: {path} differs from the checkpoint's; restoring the trained one")
            vocab.save(str(path))
    elif config.model.vocab_mapping:
        vocab = VocabMapping.load(config.model.vocab_mapping)
        source = f"model.vocab_mapping = {config.model.vocab_mapping}"
    elif path.exists() and config.training.resume:
        vocab = VocabMapping.load(str(path))
        source = f"{path} (resume)"
    else:
        size = min(config.model.draft_vocab_size, target_vocab)
        vocab = build_vocab_mapping(samples, target_vocab, size)
        source = f"computed from {len(samples)} samples"
    if vocab.t2d.numel() != target_vocab:
        raise ValueError(
            f"vocab mapping ({source}) covers {vocab.t2d.numel()} target ids, but the target "
            f"{config.model.target!r} has vocab_size {target_vocab}"
        )
    if not source.endswith("(resume)"):
        # a fresh run owns its output_dir's mapping: never leave an older run's file behind, or
        # checkpoints and `specforge export` would pair these weights with the wrong vocab
        vocab.save(str(path))
    console.print(f"vocab mapping: draft vocab {vocab.d2t.numel()} of {target_vocab} target ids ({source})")
    return vocab, path


def _resumed_vocab(config: Any) -> Optional[VocabMapping]:
    """The vocab mapping stored in the checkpoint a resumed run continues from (None: no resume,
    no checkpoint, or one older than stored mappings)."""
    if not config.training.resume:
        return None
    latest = ckpt.latest_checkpoint(config.output_dir, report=lambda m: None)  # check_resume warned
    return ckpt.checkpoint_vocab(ckpt.read_extra(latest)) if latest is not None else None
