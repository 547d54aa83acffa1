"""TTT alignment and collation on a hand-made case, checked against explicit index loops."""

import torch
from specforge_llama_eagle3.objective import align_step

from specforge_core.training import collate
from specforge_core.types import TargetFeatures


def _features(sample_id, ids, mask, argmax, hidden=2):
    T = len(ids)
    # final_hidden[t] = (t, 100*sample) so shifted rows are easy to recognise
    base = 100.0 * int(sample_id)
    final = torch.stack([torch.tensor([base + t, -(base + t)]) for t in range(T)])[:, :hidden]
    return TargetFeatures(
        sample_id=sample_id,
        input_ids=torch.tensor(ids),
        loss_mask=torch.tensor(mask, dtype=torch.uint8),
        aux_hidden=torch.randn(T, 3 * hidden),
        final_hidden=final,
        target_argmax=torch.tensor(argmax),
    )


def test_collate_right_pads():
    a = _features("1", [5, 6, 7, 8, 9, 4], [0, 0, 1, 1, 1, 1], [6, 7, 8, 9, 4, 3])
    b = _features("2", [5, 6, 7, 8], [0, 1, 1, 1], [6, 7, 8, 9])
    batch = collate([a, b])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 4], [5, 6, 7, 8, 0, 0]]
    assert batch.attention_mask.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert batch.lengths.tolist() == [6, 4]
    assert batch.num_tokens == 10
    assert torch.equal(batch.final_hidden[1, 4:], torch.zeros(2, 2))
    assert torch.equal(batch.aux_hidden[1, :4], b.aux_hidden)


def test_align_step_matches_explicit_indexing():
    # token 3 is outside the draft vocab
    t2d = torch.tensor([True, True, True, False, True, True, True, True, True, True])
    a = _features("1", [5, 6, 7, 8, 9, 4, 1], [0, 0, 1, 1, 0, 1, 1], [6, 7, 3, 9, 4, 1, 2])
    b = _features("2", [5, 6, 7, 8], [0, 1, 1, 1], [6, 7, 8, 9])
    feats = [a, b]
    batch = collate(feats)
    T = batch.input_ids.shape[1]
    for k in range(4):
        hidden, valid = align_step(batch, k, t2d)
        assert hidden.shape == (2, T, 2) and valid.dtype == torch.bool
        for i, f in enumerate(feats):
            n = f.num_tokens
            for t in range(T):
                want_valid = (
                    t + k + 2 < n
                    and bool(f.loss_mask[t + k + 2])
                    and bool(t2d[f.target_argmax[t + k + 1]])
                )
                assert bool(valid[i, t]) == want_valid, (k, i, t)
                if t + k + 1 < n:
                    assert torch.equal(hidden[i, t], f.final_hidden[t + k + 1])
                else:
                    assert torch.equal(hidden[i, t], torch.zeros(2))
    # spot checks written out by hand: sample 1, step 0 -> predicted tokens x2..x6
    _, v0 = align_step(batch, 0, t2d)
    # t=0: predicts x2 (mask 1), target argmax at 1 is 7 (in vocab) -> valid
    # t=1: predicts x3 (mask 1), argmax at 2 is 3 (not in draft vocab) -> invalid
    # t=2: predicts x4 (mask 0) -> invalid; t=3: x5 ok; t=4: x6 ok; t=5,6: past the end
    assert v0[0].tolist() == [True, False, False, True, True, False, False]
    _, v2 = align_step(batch, 2, t2d)
    # step 2, t=0 predicts x4 (mask 0); t=1 predicts x5 (argmax[4]=4 ok); t=2 predicts x6 (argmax[5]=1)
    assert v2[0].tolist() == [False, True, True, False, False, False, False]
    # sample 2 (length 4) at step 2: only t=0 could predict x4, which does not exist
    assert v2[1].tolist() == [False] * 7


def test_step_masks_match_the_explicit_loops_padded_and_packed():
    """The vectorised [K, B, T] masks the objective uses equal explicit per-position loops, on
    right-padded rows and on packed rows (no target across a document boundary)."""
    from specforge_llama_eagle3.objective import step_masks

    from specforge_core.training.packing import pack

    g = torch.Generator().manual_seed(0)
    V, K = 10, 5
    t2d = torch.rand(V, generator=g) > 0.3
    feats = []
    for i, n in enumerate([9, 3, 7, 12, 2, 5]):
        feats.append(_features(str(i), torch.randint(0, V, (n,), generator=g).tolist(),
                               (torch.rand(n, generator=g) > 0.3).int().tolist(),
                               torch.randint(0, V, (n,), generator=g).tolist()))
    for batch, docs in ((collate(feats), None), (pack(feats, 16), "packed")):
        learned_m, valid_m = step_masks(batch, t2d, K)
        B, T = batch.input_ids.shape
        assert learned_m.shape == valid_m.shape == (K, B, T)
        for k in range(K):
            for b in range(B):
                for t in range(T):
                    p = t + k + 2
                    want = p < int(batch.lengths[b]) and bool(batch.loss_mask[b, p])
                    if docs:
                        want = want and int(batch.doc_ids[b, p]) == int(batch.doc_ids[b, t])
                    assert bool(learned_m[k, b, t]) == want, (docs, k, b, t)
                    want_valid = want and bool(t2d[batch.target_argmax[b, t + k + 1]])
                    assert bool(valid_m[k, b, t]) == want_valid, (docs, k, b, t)
        assert valid_m.any() and (learned_m & ~valid_m).any()  # both kinds of rows occur
