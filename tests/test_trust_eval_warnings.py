"""The evaluation target passes its KV cache under the name this transformers version takes: no
`past_key_values` FutureWarning on every eval forward, and the cache is really used (cached greedy
decoding equals a slow one that recomputes the whole sequence every token)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from specforge_core.evaluation.target import TargetModel

TINY = Path(__file__).resolve().parents[1] / "configs" / "assets" / "tiny-target"


def test_cached_greedy_equals_slow_greedy_without_cache_warnings():
    target = TargetModel(str(TINY), [1, 4, 6])
    prompt = [1, 5, 9, 42, 17, 3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = target.greedy(prompt, 8)
    about_cache = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert about_cache == []
    ids = list(prompt)
    slow = []
    for _ in range(8):
        with torch.no_grad():
            nxt = int(target.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        slow.append(nxt)
        ids.append(nxt)
    assert fast == slow
