"""The EAGLE-3 draft training loop: batching, TTT alignment, the trainer and its checkpoints.

The trainer does not know where batches come from: a pipeline (local loop, Ray actor...) hands it
``TargetFeatures`` and it returns metrics.
"""

from specforge_core.training.alignment import align_step
from specforge_core.training.batch import Batch, collate

__all__ = ["Batch", "align_step", "collate"]
