"""Log-probabilities of given tokens without materialising full-vocabulary logits.

With vocabularies of 50k-150k, fp32 logits for a batch of 8k tokens are 1.6-4.8 GB, and autograd
would keep them for the backward pass. Here the logits exist one chunk of tokens at a time: the
forward keeps each token's log-sum-exp and the softmax of its last chunk only, and the backward
recomputes the other chunks' logits (one extra matmul each) to form
d logp / d logits = onehot(target) - softmax. Memory stays bounded by one chunk, and a batch
that fits in one chunk costs no recomputation at all.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, inv_temp: float, chunk: int) -> Tensor:
        w = weight.to(hidden.dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        last = None
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ w.t()).float()
            if inv_temp != 1.0:
                logits.mul_(inv_temp)
            target = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            # the log-sum-exp in place: torch.logsumexp would allocate a second chunk-sized block
            vmax = logits.amax(dim=-1, keepdim=True)
            total = logits.sub_(vmax).exp_().sum(dim=-1, keepdim=True)
            lse[s:s + chunk] = (vmax + total.log()).squeeze(1)
            out[s:s + chunk] = target - lse[s:s + chunk]
            last = (logits, total)
        ctx.last_probs = None
        if any(ctx.needs_input_grad[:2]):  # keep the last chunk's softmax (in place: no extra memory)
            ctx.last_probs = last[0].div_(last[1])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        inv_temp, chunk = ctx.inv_temp, ctx.chunk
        w = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        n = hidden.shape[0]
        kept, ctx.last_probs = ctx.last_probs, None  # consumed in place below; a second backward recomputes
        last_start = n - kept.shape[0] if kept is not None else -1
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            if s == last_start:
                probs = kept
            else:
                probs = (h @ w.t()).float()
                if inv_temp != 1.0:
                    probs.mul_(inv_temp)
                probs.sub_(lse[s:s + chunk, None]).exp_()
            # d logp/d logits = onehot - softmax, scaled by the upstream gradient and 1/temperature
            g = grad_out[s:s + chunk].float() * inv_temp
            d = probs.mul_(-g[:, None])
            d.scatter_add_(1, targets[s:s + chunk, None], g[:, None])
            d = d.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:s + chunk] = d @ w
            if grad_w is not None:
                grad_w.addmm_(d.t().float(), h.float())  # .float() is free on fp32
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None


CHUNK_BYTES = 512 * 1024**2  # default bound on one chunk of fp32 logits


def default_chunk_tokens(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk of fp32 logits stays within `budget_bytes`
    (2730 tokens for a 49k vocabulary, 890 for 151k)."""
    return max(1, budget_bytes // (4 * vocab_size))


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   chunk_tokens: int | None = None) -> Tensor:
    """log softmax(hidden @ weight.T / temperature)[t, targets[t]] in fp32, shape [N].

    hidden [N, dim], weight [vocab, dim], targets [N]. Peak extra memory is one chunk of
    `chunk_tokens` x vocab fp32 logits (default: `CHUNK_BYTES` worth), forward and backward.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedTokenLogprobs.apply(hidden, weight, targets, 1.0 / temperature, max(1, chunk))
