"""Draft vocab mapping: frequency ranking, ties, padding, d2t/t2d layout, save/load, config entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specforge_core.config.schema import DatasetSection, ModelSection, RunSection, SpecforgeConfig
from specforge_core.types import Sample
from specforge_core.vocab import VocabMapping, build_vocab_for_config, build_vocab_mapping

ASSETS = Path(__file__).resolve().parents[1] / "configs" / "assets"


def sample(ids, mask):
    return Sample("s", torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.uint8))


@pytest.fixture
def samples():
    # loss-masked counts: 7 x3, 2 x2, 9 x2, 4 x1, 5 x1; id 8 appears often but never masked
    return [
        sample([8, 7, 7, 2, 9, 8], [0, 1, 1, 1, 1, 0]),
        sample([8, 8, 9, 2, 7, 4, 5], [0, 0, 1, 1, 1, 1, 1]),
    ]


def test_hand_computed_mapping(samples):
    m = build_vocab_mapping(samples, target_vocab_size=12, draft_vocab_size=4)
    # top-4 by count: 7 (3), then the tie 2/9 (2 each), then the tie 4/5 (1 each) -> smaller id 4
    assert m.draft_to_target_ids.tolist() == [2, 4, 7, 9]
    assert m.d2t.tolist() == [2 - 0, 4 - 1, 7 - 2, 9 - 3]
    assert m.d2t.dtype == torch.int64 and m.t2d.dtype == torch.bool
    assert torch.nonzero(m.t2d).flatten().tolist() == [2, 4, 7, 9]
    assert (m.draft_vocab_size, m.target_vocab_size) == (4, 12)
    m.validate()


def test_padding_with_unseen_ids(samples):
    # 5 distinct masked ids (2,4,5,7,9); 3 more are the smallest unseen: 0, 1, 3 (8 is unmasked)
    m = build_vocab_mapping(samples, target_vocab_size=12, draft_vocab_size=8)
    assert m.draft_to_target_ids.tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    full = build_vocab_mapping(samples, target_vocab_size=12, draft_vocab_size=12)
    assert full.draft_to_target_ids.tolist() == list(range(12)) and bool(full.t2d.all())
    assert full.d2t.tolist() == [0] * 12


def test_errors(samples):
    with pytest.raises(ValueError, match="draft_vocab_size 13 > target vocab size 12"):
        build_vocab_mapping(samples, 12, 13)
    with pytest.raises(ValueError, match="token id 9 >= target vocab size 9"):
        build_vocab_mapping(samples, 9, 2)


def test_save_load_round_trip(samples, tmp_path):
    m = build_vocab_mapping(samples, 12, 4)
    path = m.save(tmp_path / "sub" / "vocab.safetensors")
    back = VocabMapping.load(path)
    assert torch.equal(back.d2t, m.d2t) and torch.equal(back.t2d, m.t2d)
    from safetensors.torch import load_file

    raw = load_file(str(path))
    assert set(raw) == {"d2t", "t2d"} and raw["d2t"].dtype == torch.int64 and raw["t2d"].dtype == torch.bool


def test_load_rejects_inconsistent_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"d2t": torch.tensor([0, 0]), "t2d": torch.tensor([True, False, True])}, str(tmp_path / "bad.st"))
    with pytest.raises(ValueError, match="t2d does not mark"):
        VocabMapping.load(tmp_path / "bad.st")
    save_file({"d2t": torch.tensor([0])}, str(tmp_path / "half.st"))
    with pytest.raises(ValueError, match=r"lacks tensors \['t2d'\]"):
        VocabMapping.load(tmp_path / "half.st")


def test_build_vocab_for_config_on_tiny_assets(tmp_path):
    cfg = SpecforgeConfig(
        run=RunSection(name="t", output_dir=str(tmp_path / "{name}")),
        model=ModelSection(target=str(ASSETS / "tiny-target"), draft_vocab_size=256),
        dataset=DatasetSection(path=[str(ASSETS / "data" / "sample_chat.jsonl")], cache_dir=str(tmp_path / "c")),
    )
    path = build_vocab_for_config(cfg)
    assert path == tmp_path / "t" / "vocab_mapping.safetensors"
    m = VocabMapping.load(path)
    assert m.draft_vocab_size == 256 and m.target_vocab_size == 1856  # config.vocab_size, > len(tokenizer)
    # reference: a plain Counter over the masked tokens of the same samples
    from collections import Counter

    from specforge_core.data import build_samples, load_tokenizer

    samples, _ = build_samples(cfg.dataset, load_tokenizer(cfg.model.target))
    c = Counter(t for s in samples for t in s.input_ids[s.loss_mask.bool()].tolist())
    # the shipped data has fewer than 256 distinct loss tokens, so padding is exercised too
    assert len(c) < 256
    top = (sorted(c, key=lambda t: (-c[t], t)) + [t for t in range(1856) if t not in c])[:256]
    assert m.draft_to_target_ids.tolist() == sorted(top)
    eot = load_tokenizer(cfg.model.target).convert_tokens_to_ids("<|eot_id|>")
    assert bool(m.t2d[eot])
