"""The samples a run trains on: tokenized (cached) and filtered to those the draft can learn from.

Shared by every pipeline and by ``specforge data features``, so their sample sets and accounting
agree. What "can learn from" means is the draft algorithm's (``FeatureSpec.min_loss_index``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from specforge_core.build import algorithm
from specforge_core.data.build import build_samples, load_tokenizer
from specforge_core.data.formats import DataError
from specforge_core.types import Sample


def trainable(sample: Sample, min_loss_index: int) -> bool:
    """A loss token at index >= ``min_loss_index`` (the first position the objective predicts)."""
    return sample.num_tokens > min_loss_index and bool(sample.loss_mask[min_loss_index:].any())


def load_training_samples(config: Any, console: Any, features: Any = None, registry: Any = None):
    """``(samples, usable, data_stats, skipped)``: every tokenized sample, those with something to
    learn, the loader's counts and the skip reasons. ``features``: the draft algorithm's
    ``FeatureSpec`` (None: the configured algorithm's)."""
    if features is None:
        features = algorithm(config, registry).features
    first = int(features.min_loss_index)
    tokenizer = load_tokenizer(config.model.target, config.model.trust_remote_code)
    samples, data_stats = build_samples(config.dataset, tokenizer, progress=config.logging.progress)
    console.print(f"data: {data_stats.summary()}")
    usable = [s for s in samples if trainable(s, first)]
    skipped: Counter[str] = Counter()
    skipped[f"no loss token at index >= {first}"] = len(samples) - len(usable)
    if not usable:
        raise DataError(f"dataset.path = {config.dataset.path}: no sample has anything to learn ({data_stats.summary()}; "
                        f"{len(samples) - len(usable)} without a loss token at index >= {first}); check the data, "
                        "dataset.max_seq_length and dataset.chat_template")
    return samples, usable, data_stats, skipped
