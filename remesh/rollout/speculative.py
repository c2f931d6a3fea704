"""Lossless verification of draft trees (chains are trees with one child per node).

A draft is a tree of proposed tokens hanging off the sequence's last token (the root, node 0).
The target model scores every node in one forward; `verify` then walks from the root:

- at a node whose children were proposed deterministically (point masses: n-gram, history or
  a draft model's top-k), one token y is drawn from the target distribution p there, and the
  child proposing y is accepted; if none does, y is emitted. This is recursive rejection
  sampling for point masses (child c accepted with probability p(c) / (1 - mass of the
  children rejected before it), else the residual is p without them), realised with one
  uniform per position;
- at a node whose child was sampled from a draft distribution q, it is accepted with
  probability min(1, p(x) / q(x)), else r becomes max(0, p - q), renormalised (Leviathan et al.;
  SpecInfer's multi-candidate rule when there are several such children), and when no child is
  accepted one token is drawn from r;
- at a leaf, a bonus token is drawn from p.

Every emitted token is therefore an exact sample of the target distribution given its prefix,
and its behaviour log-prob is log p(token) at its parent node. The target distribution p is
`target_logprobs` of the logits, so temperature, top-k and top-p mean what plain sampling means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from remesh.rollout.sampling import inverse_cdf


@dataclass
class Draft:
    """Proposed tokens of one sequence, in topological order (a parent before its children).

    parents[i] is the node index of token i's parent: 0 is the root (the last emitted token,
    not part of `tokens`), i + 1 is `tokens[i]`. `q` (optional) holds the draft distribution
    each token was sampled from, [len(tokens), V] probabilities; None means point masses.
    """

    tokens: list[int]
    parents: list[int]
    q: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} draft tokens but {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not 0 <= p <= i:  # node i + 1 may only hang off the root or an earlier node
                raise ValueError(f"draft node {i + 1} has parent {p}: parents must come first")

    @classmethod
    def chain(cls, tokens: list[int], q: Tensor | None = None) -> Draft:
        return cls(list(tokens), list(range(len(tokens))), q)

    @classmethod
    def empty(cls) -> Draft:
        return cls([], [])

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, node: int, token: int) -> int | None:
        """The first child of `node` that proposes `token` (its node index), or None."""
        return next((c for c, (t, p) in enumerate(zip(self.tokens, self.parents), start=1) if p == node and t == token),
                    None)

    def depths(self) -> list[int]:
        """Depth of every node, root included (root 0)."""
        d = [0]
        for p in self.parents:
            d.append(d[p] + 1)
        return d


def matched_depth(draft: Draft, emitted: list[int]) -> int:
    """The depth to which a point-mass draft is accepted when the target emits `emitted` from
    its root on: the longest root path spelling a prefix of `emitted`. By the point-mass rule of
    `verify` (a token drawn from p with the position's uniform; the child proposing it accepted),
    this is exactly what verifying the draft would accept, so plain decoding's own tokens score a
    draft that was never verified."""
    node, depth = 0, 0
    for tok in emitted:
        node = draft.child(node, tok)
        if node is None:
            break
        depth += 1
    return depth


def tree_mask(drafts: list[Draft], n_nodes: int, device: torch.device | str = "cpu") -> Tensor:
    """[B, 1 + n_nodes, 1 + n_nodes] bool: node i attends to node j iff j is i or an ancestor.
    Padding nodes (beyond a draft's length) attend to themselves only."""
    n = 1 + n_nodes
    # (sequence, node, ancestor) index lists, then one write: a tensor op per node costs ~10 us
    # of host time in every verify step
    seq_idx, node_idx, anc_idx = [], [], []
    for b, d in enumerate(drafts):
        lines = [[0]]  # node -> itself and its ancestors
        for i, p in enumerate(d.parents, start=1):
            lines.append([i, *lines[p]])
        for i, line in enumerate(lines):
            seq_idx += [b] * len(line)
            node_idx += [i] * len(line)
            anc_idx += line
    mask = torch.eye(n, dtype=torch.bool).repeat(len(drafts), 1, 1)
    mask[seq_idx, node_idx, anc_idx] = True
    return mask.to(device)


@dataclass
class Verified:
    """Outcome of verifying one sequence's draft."""

    path: list[int]  # accepted node indices (root excluded), root to leaf
    tokens: list[int]  # emitted tokens: the accepted drafts, then one sampled token
    logprobs: list[float]  # target log-prob of each emitted token


def residual(p: Tensor, q: Tensor) -> Tensor:
    """Where to sample from after rejecting a token drawn from q: max(0, p - q), unnormalised."""
    return (p - q).clamp_min(0.0)


def verify_drawn(drawn: list[int], drawn_logprobs: list[float], draft: Draft) -> Verified:
    """`verify` of a point-mass draft from the token drawn at every node: `drawn[i]` is node i's
    draw from p with the uniform of its depth, `drawn_logprobs[i]` its log p. The walk follows the
    children that proposed the draws; the draws themselves can be made for all nodes of all
    sequences at once, on the device, so only two numbers per node leave it."""
    if draft.q is not None:
        raise ValueError("verify_drawn is for point-mass drafts; a sampled draft needs verify's min(1, p/q) tests")
    path: list[int] = []
    node = 0
    while True:
        match = draft.child(node, drawn[node])
        if match is None:
            parents = [0] + path
            return Verified(path, [draft.tokens[c - 1] for c in path] + [drawn[node]],
                            [drawn_logprobs[x] for x in parents])
        path.append(match)
        node = match


def verify(logp: Tensor, draft: Draft, uniforms: Tensor, generator: torch.Generator | None = None) -> Verified:
    """Verify one draft. `logp` [>= 1 + len(draft), V]: target log-probs at the root and at every
    draft node. `uniforms` [>= depth + 1]: the sequence's own uniform for each position it may
    emit; every emitted token is drawn from its distribution with that position's uniform
    (inverse CDF), so with point-mass drafts the output equals plain sampling's token for token,
    whatever was drafted. `generator` draws the extra uniforms of min(1, p/q) tests."""
    children: list[list[int]] = [[] for _ in range(len(draft) + 1)]
    for i, p in enumerate(draft.parents, start=1):
        children[p].append(i)
    path: list[int] = []
    node = 0
    while True:
        kids = children[node]
        u = uniforms[len(path)]
        dist = logp[node].exp()
        if kids and draft.q is not None:  # sampled from q: accept with min(1, r/q), else r = max(0, r - q)
            accepted = None
            for c in kids:
                x, q = draft.tokens[c - 1], draft.q[c - 1]
                if float(torch.rand((), generator=generator)) * float(q[x]) < float(dist[x]):
                    accepted = c
                    break
                rest = residual(dist, q)
                total = float(rest.sum())
                if not total > 0:  # p == q on the support (measure zero): draw from the current distribution
                    break
                dist = rest / total
            if accepted is not None:
                path.append(accepted)
                node = accepted
                continue
            tok = int(inverse_cdf(dist[None], u[None]))
        else:  # point masses (or a leaf): draw from p; the child proposing that token is accepted
            tok = int(inverse_cdf(dist[None], u[None]))
            match = next((c for c in kids if draft.tokens[c - 1] == tok), None)
            if match is not None:
                path.append(match)
                node = match
                continue
        tokens = [draft.tokens[c - 1] for c in path] + [tok]
        parents = [0] + path
        return Verified(path, tokens, logp[parents, tokens].tolist())
