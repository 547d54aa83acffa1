"""The generic draft training loop: batching, the trainer and its checkpoints.

The trainer does not know where batches come from: a pipeline (local loop, Ray actor...) hands it
``TargetFeatures`` and it returns metrics. What a step computes is the draft algorithm's
(``components.DraftAlgorithm``; EAGLE-3's TTT unroll and alignment live in its plugin).
"""

from specforge_core.training.batch import Batch, collate

__all__ = ["Batch", "collate"]
