from __future__ import annotations

import math
import random

import pytest
import torch

from remesh.data import balanced_micro_batches, pack_sequences, shifted_targets, target_loss_mask


@pytest.mark.parametrize("seed", range(5))
def test_balanced_micro_batches_random(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 1000) for _ in range(rng.randint(50, 300))]
    budget = 4096
    bins = balanced_micro_batches(lengths, budget)
    # Every index exactly once, sorted within a bin, budget respected.
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) and b for b in bins)
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= budget
    # Near the minimum number of bins, and balanced.
    assert len(bins) <= math.ceil(sum(lengths) / budget) + 1
    assert max(loads) - min(loads) <= 0.1 * budget
    assert balanced_micro_batches(lengths, budget) == bins  # deterministic


def test_balanced_micro_batches_edges():
    assert balanced_micro_batches([], 10) == []
    assert balanced_micro_batches([3], 10) == [[0]]
    assert balanced_micro_batches([10, 10, 10], 10) == [[0], [1], [2]]
    # ceil(12 / 10) = 2 bins: 6 and 6, not 10 and 2.
    assert balanced_micro_batches([4, 2, 2, 4], 10) == [[0, 1], [2, 3]]
    # Needs a third bin although ceil(18 / 10) = 2: 6+6 > 10.
    assert len(balanced_micro_batches([6, 6, 6], 10)) == 3
    with pytest.raises(ValueError, match="11 tokens, more than the micro-batch token budget 10"):
        balanced_micro_batches([3, 11], 10)


def test_pack_sequences():
    b = pack_sequences([[5, 6, 7], [8], [9, 10]])
    assert b.tokens.tolist() == [5, 6, 7, 8, 9, 10] and b.tokens.dtype == torch.long
    assert b.positions.tolist() == [0, 1, 2, 0, 0, 1] and b.positions.dtype == torch.long
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert (b.max_seqlen, b.num_tokens, b.num_seqs, b.loss_mask) == (3, 6, 3, None)
    assert b.seq_lens() == [3, 1, 2]
    assert b.to("cpu").tokens.tolist() == b.tokens.tolist()
    with pytest.raises(ValueError):
        pack_sequences([[1], []])
    with pytest.raises(ValueError):
        pack_sequences([[1, 2]], [[True]])


def test_shifted_targets_and_loss_mask():
    # Seq A = prompt 11 12 | response 13 14; seq B = prompt 21 | response 22.
    # The first token's mask is forced False even if given True.
    b = pack_sequences([[11, 12, 13, 14], [21, 22]], [[True, False, True, True], [False, True]])
    assert b.loss_mask.tolist() == [False, False, True, True, False, True]
    targets, valid = shifted_targets(b)
    assert valid.tolist() == [True, True, True, False, True, False]
    assert targets[valid].tolist() == [12, 13, 14, 22]
    # Position t is trained when tokens[t+1] is a response token of the same sequence:
    # 12->13, 13->14 in A, 21->22 in B.
    assert target_loss_mask(b).tolist() == [False, True, True, False, True, False]
    # No loss mask: every in-sequence next token is trained on.
    assert target_loss_mask(pack_sequences([[1, 2], [3]])).tolist() == [True, False, False]
