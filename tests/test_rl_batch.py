"""Packing RL samples for the trainers' forwards: shared prompts give the log-probs and gradients
of plain prompt + response packing on fewer tokens; micro-batches keep a prompt's samples together."""

from __future__ import annotations

import pytest
import torch

from remesh.model import AttnContext
from remesh.rl.batch import Responses, logprobs_head, micro_batches, pack_micro_batch, packed_tokens, prompt_groups
from remesh.rl.batch import forward_packed
from tests.models import tiny_model

P1, P2, P3 = [5, 9, 2, 7], [3, 3, 8], [11, 4, 6, 1, 2]
# two groups of unequal response lengths (one of them with two of equal length), an empty response
# and a prompt with a single sample, interleaved as a shuffled mini-batch would give them
RESPONSES = Responses(prompt_index=[0, 1, 0, 2, 1, 0, 1], prompt_ids=[P1, P2, P1, P3, P2, P1, P2],
                      response_ids=[[4, 4, 1], [7, 2, 9, 9, 3], [8], [5, 6], [1, 2, 3, 4, 5], [], [6]],
                      finish_reason=["stop"] * 7)


def logprobs_and_grads(model, idx, share: bool):
    model.zero_grad(set_to_none=True)
    mb = pack_micro_batch(RESPONSES, idx, torch.device("cpu"), share_prompts=share)
    logp = logprobs_head(model, forward_packed(model, mb), mb)
    (logp * torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)).sum().backward()
    return mb, logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen2", None), ("mistral", 3)])
def test_shared_prompts_give_the_same_logprobs_and_gradients(family, window):
    model = tiny_model(family, sliding_window=window).double()  # RMSNorm and log-softmax still run in fp32
    idx = [3, 0, 4, 1, 2, 5, 6]
    plain, logp, grads = logprobs_and_grads(model, idx, share=False)
    shared, logp_s, grads_s = logprobs_and_grads(model, idx, share=True)
    assert logp.shape == logp_s.shape == (7, 5)
    torch.testing.assert_close(logp_s, logp, rtol=0, atol=1e-12)
    for name, g in grads.items():
        # the gradients of a shared prompt are summed in another order: fp32 rounding apart
        torch.testing.assert_close(grads_s[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)
    # each shared prompt once: P1 + 3 + 1 + 0, P2 + 5 + 5 + 1, P3 + 2 (alone: packed whole)
    assert shared.tokens.numel() == (4 + 4) + (3 + 11) + (5 + 2) == 29
    assert plain.tokens.numel() == sum(len(RESPONSES.prompt_ids[i]) + len(RESPONSES.response_ids[i]) for i in idx)
    assert shared.prefix_of is not None and plain.prefix_of is None
    # sample 3 alone (P3 + response), then P1 once, then sample 0's response at P1's next positions
    assert shared.seq_lens[:3] == [7, 4, 3] and shared.prefix_of[:3] == [-1, -1, 1]
    assert shared.positions[11:14].tolist() == [4, 5, 6]


def test_prompt_groups_and_packed_tokens():
    assert prompt_groups(RESPONSES, [6, 0, 1, 2]) == [[6, 1], [0, 2]]
    assert prompt_groups(RESPONSES, [6, 0], share_prompts=False) == [[6], [0]]
    assert packed_tokens(RESPONSES, [1, 4, 6]) == 3 + 5 + 5 + 1


def test_micro_batches_keep_a_prompts_samples_together():
    idx = list(range(7))
    # budget 20: group P2 (14 tokens) and P1 (8) cannot share a micro-batch, P3 (7) joins P1
    micros = micro_batches(RESPONSES, idx, 20)
    assert sorted(map(sorted, micros)) == [[0, 2, 3, 5], [1, 4, 6]]
    # budget 10: P2's group no longer fits, so its samples are packed alone
    micros = micro_batches(RESPONSES, idx, 10)
    assert all(sum(packed_tokens(RESPONSES, g) for g in prompt_groups(RESPONSES, m)) <= 10 for m in micros)
    assert sorted(i for m in micros for i in m) == idx
    # order inside a micro-batch follows idx (a shuffled mini-batch keeps its order)
    assert micro_batches(RESPONSES, [5, 2, 0], 100) == [[5, 2, 0]]


def test_prefix_of_must_point_to_an_earlier_sequence_without_a_prefix():
    with pytest.raises(ValueError, match="sequence 0: prefix_of 1"):
        AttnContext.packed([2, 3], prefix_of=[1, -1])
    with pytest.raises(ValueError, match="sequence 2: prefix_of 1"):
        AttnContext.packed([2, 3, 1], prefix_of=[-1, 0, 1])
    with pytest.raises(ValueError, match="2 entries for 3"):
        AttnContext.packed([2, 3, 1], prefix_of=[-1, 0])
    assert AttnContext.packed([2, 3], prefix_of=[-1, -1]).prefix_of is None
