"""The Llama-family model: parity with transformers, packing, KV cache, tree masks, sliding
window, chunked log-probs, value head and the structure that parallelism relies on."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from remesh.checkpoint import load_hf, save_hf
from remesh.model import AttnContext, Transformer, token_logprobs
from remesh.model.llama import rope_inv_freq
from tests.models import tiny_args, tiny_model

FAMILIES = ["llama", "qwen2", "mistral"]
VOCAB = 97  # tiny_args' default


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def forward_seqs(model: Transformer, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pack `seqs` (each starting at position 0), run the model, return each sequence's hidden states."""
    lens = [len(s) for s in seqs]
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        h = model(torch.cat(seqs), positions, AttnContext.packed(lens))
    return list(h.split(lens))


def full_logits(model: Transformer, seq: torch.Tensor) -> torch.Tensor:
    """Logits of one sequence run alone from position 0, no cache."""
    with torch.no_grad():
        return model.logits(forward_seqs(model, [seq])[0])


def step(model: Transformer, cache, slots, cache_lens, chunks, mask=None) -> list[torch.Tensor]:
    """One cached forward: chunk i is appended to slot slots[i] after cache_lens[i] cached tokens."""
    if mask is None:
        positions = torch.cat([torch.arange(s, s + len(c)) for s, c in zip(cache_lens, chunks)])
    else:  # tree: the caller gives (tokens, positions) pairs
        positions = torch.cat([p for _, p in chunks])
        chunks = [t for t, _ in chunks]
    lens = [len(c) for c in chunks]
    ctx = AttnContext.with_cache(cache, slots, cache_lens, lens, mask=mask)
    with torch.no_grad():
        h = model(torch.cat(chunks), positions, ctx)
    return list(model.logits(h).split(lens))


# 1. parity with transformers -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers(family, tmp_path):
    """save_hf writes a checkpoint transformers loads as the right class, with equal fp32 logits
    (length 40 > 32, llama3 rope scaling's original context, so the scaling is exercised)."""
    import transformers

    model = tiny_model(family).eval()
    save_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[family]
    assert config["model_type"] == family and config["architectures"] == [arch]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    if family == "qwen2":
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in names
        assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= names
        assert "model.layers.0.self_attn.o_proj.bias" not in names
    else:
        assert "lm_head.weight" in names and not any(n.endswith("bias") for n in names)
    if family == "llama":  # the scaling changes the frequencies, so the parity below covers it
        plain = rope_inv_freq(dataclasses.replace(model.args, rope_scaling=None))
        assert not torch.allclose(model.inv_freq, plain)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    tokens = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
    ours = torch.stack([model.logits(h) for h in forward_seqs(model, list(tokens))])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# 2. packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_per_sequence(family):
    """Packed sequences of different lengths, and equal-length ones (batched path), give each
    sequence the logits it gets when run alone."""
    model = tiny_model(family).eval()
    for lens in ([5, 17, 1, 30], [12, 12, 12]):
        seqs = [torch.randint(0, VOCAB, (n,)) for n in lens]
        packed = [model.logits(h) for h in forward_seqs(model, seqs)]
        for seq, logits in zip(seqs, packed):
            torch.testing.assert_close(logits, full_logits(model, seq), atol=1e-5, rtol=0)


# 3. KV cache ----------------------------------------------------------------------------------

# "mistral-window": a sliding window shorter than the sequences, so the cache paths must apply it
CACHE_CASES = {"llama": {}, "qwen2": {}, "mistral-window": {"sliding_window": 4}}


def cache_model(case: str) -> Transformer:
    return tiny_model(case.split("-")[0], **CACHE_CASES[case]).eval()


@pytest.mark.parametrize("case", CACHE_CASES)
def test_kv_cache_prefill_then_decode(case):
    """Prefill a prompt into the cache, then decode one token at a time: logits equal the full
    forward at the same positions."""
    model = cache_model(case)
    seq = torch.randint(0, VOCAB, (13,))
    ref = full_logits(model, seq)
    cache = model.new_kv_cache(n_slots=2, max_len=16)
    out = [step(model, cache, [1], [0], [seq[:7]])[0]]
    for t in range(7, 13):
        out.append(step(model, cache, [1], [t], [seq[t:t + 1]])[0])
    torch.testing.assert_close(torch.cat(out), ref, atol=1e-5, rtol=0)


# slots with a gap (decoding gathers each sequence's rows), a contiguous run out of order and a
# sorted run not starting at 0 (decoding reads the cache in place, in slot order)
@pytest.mark.parametrize("slots", [[2, 0, 3], [1, 0, 2], [1, 2, 3]])
@pytest.mark.parametrize("case", CACHE_CASES)
def test_kv_cache_ragged_prefill_batched_decode(case, slots):
    """Several sequences with different prompt lengths in different slots: one ragged prefill,
    then batched one-token decode steps; every logit equals that sequence's full forward."""
    model = cache_model(case)
    prompt_lens, n_decode = [3, 9, 5], 4
    seqs = [torch.randint(0, VOCAB, (n + n_decode,)) for n in prompt_lens]
    refs = [full_logits(model, s) for s in seqs]
    cache = model.new_kv_cache(n_slots=4, max_len=16)
    prefill = step(model, cache, slots, [0, 0, 0], [s[:n] for s, n in zip(seqs, prompt_lens)])
    for logits, ref, n in zip(prefill, refs, prompt_lens):
        torch.testing.assert_close(logits, ref[:n], atol=1e-5, rtol=0)
    for i in range(n_decode):
        lens = [n + i for n in prompt_lens]
        out = step(model, cache, slots, lens, [s[t:t + 1] for s, t in zip(seqs, lens)])
        for logits, ref, t in zip(out, refs, lens):
            torch.testing.assert_close(logits[0], ref[t], atol=1e-5, rtol=0)


def test_which_prefills_pad():
    """On a GPU without the varlen kernel, prompts of different lengths fill the cache in one
    padded SDPA call per layer where the padded square at most quadruples their causal triangles'
    work: [3, 9, 5]: 3 x 9^2 = 243 <= 4 x (6 + 45 + 15) = 264; [1] x 8 + [30]: 9 x 30^2 = 8100 >
    4 x (8 + 465); [8, 8, 8, 768]: 4 x 768^2 > 4 x (3 x 36 + 295,296). Equal lengths batch unpadded,
    and scores of 3 x 9 heads x 4096^2 > 2^26 are not built. A CPU prefill never pads: a masked
    call there computes blocks a causal one skips, and a call costs little."""
    from remesh.model import attention

    assert attention._pads_cheaply([3, 9, 5], heads=4)
    assert not attention._pads_cheaply([1] * 8 + [30], heads=4)
    assert not attention._pads_cheaply([8, 8, 8, 768], heads=4)
    assert not attention._pads_cheaply([7, 7], heads=4)
    assert not attention._pads_cheaply([4096, 4000, 4090], heads=9)
    assert not attention._pads_prefill(torch.zeros(17, 4, 8), [3, 9, 5])


@pytest.mark.parametrize("case", CACHE_CASES)
def test_a_padded_prefill_gives_each_prompt_its_own_logits(case, monkeypatch):
    """The padded prefill (forced here, on the CPU), then batched decode steps: every prompt's
    logits are its full forward's, with GQA and a sliding window (whose padding queries would see
    no key without the mask's fallback), one padded call per layer."""
    from remesh.model import attention

    calls = []
    padded = attention._attend_padded
    monkeypatch.setattr(attention, "_pads_prefill", lambda q, seqlens: True)
    monkeypatch.setattr(attention, "_attend_padded", lambda *a: calls.append(1) or padded(*a))
    model = cache_model(case)
    prompt_lens, n_decode = [3, 9, 1, 5], 3
    seqs = [torch.randint(0, VOCAB, (n + n_decode,)) for n in prompt_lens]
    cache = model.new_kv_cache(n_slots=4, max_len=16)
    prefill = step(model, cache, [0, 1, 2, 3], [0] * 4, [s[:n] for s, n in zip(seqs, prompt_lens)])
    assert len(calls) == model.args.n_layers
    for logits, s, n in zip(prefill, seqs, prompt_lens):
        torch.testing.assert_close(logits, full_logits(model, s)[:n], atol=1e-5, rtol=0)
    for i in range(n_decode):
        lens = [n + i for n in prompt_lens]
        out = step(model, cache, [0, 1, 2, 3], lens, [s[t:t + 1] for s, t in zip(seqs, lens)])
        for logits, s, t in zip(out, seqs, lens):
            torch.testing.assert_close(logits[0], full_logits(model, s)[t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CACHE_CASES)
def test_kv_cache_ragged_chunks_after_cached_prefixes(case):
    """Chunks of different lengths appended to cached prefixes of different lengths (a chunked
    prefill; a fill from position 0 takes the packed forward's path instead): logits equal each
    sequence's full forward."""
    model = cache_model(case)
    prefix_lens, chunk_lens, slots = [3, 9, 5], [2, 4, 1], [2, 0, 1]
    seqs = [torch.randint(0, VOCAB, (p + c,)) for p, c in zip(prefix_lens, chunk_lens)]
    cache = model.new_kv_cache(n_slots=3, max_len=16)
    step(model, cache, slots, [0, 0, 0], [s[:p] for s, p in zip(seqs, prefix_lens)])
    out = step(model, cache, slots, prefix_lens, [s[p:] for s, p in zip(seqs, prefix_lens)])
    for logits, s, p in zip(out, seqs, prefix_lens):
        torch.testing.assert_close(logits, full_logits(model, s)[p:], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_and_cache_fill_on_a_gpu(dtype):
    """On a GPU, in fp32 (SDPA; flash attention takes no fp32) and bf16 (the varlen kernel): a
    packed forward and a ragged fill of the cache from position 0 give each sequence's logits
    run alone."""
    model = tiny_model("llama").eval().to("cuda", dtype)
    seqs = [torch.randint(0, VOCAB, (n,), device="cuda") for n in (3, 9, 5)]
    lens = [len(s) for s in seqs]
    positions = torch.cat([torch.arange(n, device="cuda") for n in lens])
    cache = model.new_kv_cache(n_slots=3, max_len=16)
    tol = {"atol": 1e-4, "rtol": 0} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    with torch.no_grad():
        alone = [model.logits(model(s, torch.arange(len(s), device="cuda"), AttnContext.packed([len(s)], "cuda")))
                 for s in seqs]
        packed = model.logits(model(torch.cat(seqs), positions, AttnContext.packed(lens, "cuda"))).split(lens)
        filled = model.logits(model(torch.cat(seqs), positions,
                                    AttnContext.with_cache(cache, [2, 0, 1], [0, 0, 0], lens))).split(lens)
    for a, p, f in zip(alone, packed, filled):
        torch.testing.assert_close(p, a, **tol)
        torch.testing.assert_close(f, a, **tol)


@pytest.mark.parametrize("case", CACHE_CASES)
def test_kv_cache_draft_verification(case):
    """k draft tokens at once after cached prefixes of different lengths (same k for all
    sequences): logits equal the full forward."""
    model = cache_model(case)
    prefix_lens, k, slots = [4, 10, 6], 3, [1, 2, 0]
    seqs = [torch.randint(0, VOCAB, (n + k,)) for n in prefix_lens]
    cache = model.new_kv_cache(n_slots=3, max_len=16)
    step(model, cache, slots, [0, 0, 0], [s[:n] for s, n in zip(seqs, prefix_lens)])
    out = step(model, cache, slots, prefix_lens, [s[n:] for s, n in zip(seqs, prefix_lens)])
    for logits, seq, n in zip(out, seqs, prefix_lens):
        torch.testing.assert_close(logits, full_logits(model, seq)[n:], atol=1e-5, rtol=0)


# 4. tree masks --------------------------------------------------------------------------------

# new tokens [a, b1, b2]: b1 and b2 are both children of a and must not see each other
TREE = torch.tensor([[1, 0, 0],
                     [1, 1, 0],
                     [1, 0, 1]], dtype=torch.bool)


@pytest.mark.parametrize("case", [*CACHE_CASES, "mistral"])
def test_tree_mask_with_cache_and_rollback(case):
    """A tree mask among the new tokens after a cached prefix gives each branch the logits of
    that branch run as a plain sequence; then the rejected entry left in the cache does not
    matter: rewriting the accepted token at its position and decoding on match the full forward.
    Under a sliding window (4 < the prefixes), b2 (index 2, depth 1) sees as far back as b1."""
    model = cache_model(case) if case in CACHE_CASES else tiny_model(case).eval()
    prefix_lens, slots = [5, 9], [1, 0]
    prefixes = [torch.randint(0, VOCAB, (n,)) for n in prefix_lens]
    trees = [torch.randint(0, VOCAB, (3,)) for _ in prefix_lens]  # [a, b1, b2] per sequence
    cache = model.new_kv_cache(n_slots=2, max_len=16)
    step(model, cache, slots, [0, 0], prefixes)
    chunks = [(t, torch.tensor([p, p + 1, p + 1])) for t, p in zip(trees, prefix_lens)]
    out = step(model, cache, slots, prefix_lens, chunks, mask=TREE.expand(2, 3, 3))
    for logits, prefix, (a, b1, b2) in zip(out, prefixes, trees):
        branch1 = full_logits(model, torch.cat([prefix, torch.stack([a, b1])]))
        branch2 = full_logits(model, torch.cat([prefix, torch.stack([a, b2])]))
        torch.testing.assert_close(logits[0], branch1[-2], atol=1e-5, rtol=0)  # a
        torch.testing.assert_close(logits[1], branch1[-1], atol=1e-5, rtol=0)  # b1
        torch.testing.assert_close(logits[2], branch2[-1], atol=1e-5, rtol=0)  # b2

    # sequence 0 accepts b2 (whose entry sits at p+2, and b1's rejected one at p+1), sequence 1
    # accepts b1 (already in place; b2's rejected entry stays at p+2, beyond the cached length)
    accepted = [trees[0][2], trees[1][1]]
    kept = [p + 1 for p in prefix_lens]  # prefix + a
    out = step(model, cache, slots, kept, [t[None] for t in accepted])
    nxt = torch.randint(0, VOCAB, (2,))
    out2 = step(model, cache, slots, [p + 1 for p in kept], [t[None] for t in nxt])
    for i in range(2):
        seq = torch.cat([prefixes[i], torch.stack([trees[i][0], accepted[i], nxt[i]])])
        ref = full_logits(model, seq)
        torch.testing.assert_close(out[i][0], ref[-2], atol=1e-5, rtol=0)
        torch.testing.assert_close(out2[i][0], ref[-1], atol=1e-5, rtol=0)


def test_tree_mask_in_a_cache_fill_from_position_zero():
    """A custom mask over a fill from position 0 is honoured (a fill without one attends as the
    packed forward, causally): the same logits as that mask without a cache."""
    model = tiny_model("llama").eval()
    p = 4
    mask = torch.ones(p + 3, p + 3, dtype=torch.bool).tril()
    mask[p:, p:] = TREE
    seqs = [torch.randint(0, VOCAB, (p + 3,)) for _ in range(2)]
    positions = [torch.tensor(list(range(p + 2)) + [p + 1]) for _ in seqs]
    ctx = AttnContext.packed([p + 3, p + 3])
    ctx.mask = mask.expand(2, -1, -1)
    with torch.no_grad():
        want = model.logits(model(torch.cat(seqs), torch.cat(positions), ctx)).split(p + 3)
    got = step(model, model.new_kv_cache(n_slots=2, max_len=16), [1, 0], [0, 0], list(zip(seqs, positions)),
               mask=mask.expand(2, -1, -1))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_tree_mask_without_cache():
    """Without a cache, a custom mask over whole equal-length sequences is honoured too: the
    mask of a prompt followed by a two-branch tree gives each branch its plain-sequence logits."""
    model = tiny_model("llama").eval()
    p = 4
    mask = torch.ones(p + 3, p + 3, dtype=torch.bool).tril()
    mask[p:, p:] = TREE  # prompt causal, then [a, b1, b2]
    seqs = [torch.randint(0, VOCAB, (p + 3,)) for _ in range(2)]
    ctx = AttnContext.packed([p + 3, p + 3])
    ctx.mask = mask.expand(2, -1, -1)
    positions = torch.tensor(list(range(p + 2)) + [p + 1]).repeat(2)
    with torch.no_grad():
        out = model.logits(model(torch.cat(seqs), positions, ctx)).split(p + 3)
    for logits, s in zip(out, seqs):
        torch.testing.assert_close(logits[:p + 2], full_logits(model, s[:p + 2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[p + 2], full_logits(model, torch.cat([s[:p + 1], s[p + 2:]]))[-1],
                                   atol=1e-5, rtol=0)


# 5. sliding window ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_matches_transformers(family, tmp_path):
    """Mistral or Qwen2 with sliding_window=8 on a length-20 sequence equals transformers' model
    (both eager and sdpa apply the window on CPU), and the window matters. Qwen2 windows the
    layers from max_window_layers on: the saved config windows them all, as remesh does."""
    import transformers

    model = tiny_model(family, sliding_window=8).eval()
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] == 8
    tokens = torch.randint(0, VOCAB, (2, 20))
    ours = torch.stack([model.logits(h) for h in forward_seqs(model, list(tokens))])
    no_window = tiny_model(family).eval()
    assert (torch.stack([no_window.logits(h) for h in forward_seqs(no_window, list(tokens))]) - ours).abs().max() > 1e-2
    # packed with a shorter sequence (not windowed) next to the windowed ones
    short = torch.randint(0, VOCAB, (5,))
    packed = forward_seqs(model, [tokens[0], short, tokens[1]])
    torch.testing.assert_close(model.logits(packed[2]), ours[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.logits(packed[1]), full_logits(model, short), atol=1e-5, rtol=0)
    for impl in ("eager", "sdpa"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                               attn_implementation=impl).eval()
        assert type(hf).__name__ == f"{family.capitalize()}ForCausalLM"
        with torch.no_grad():
            ref = hf(tokens).logits
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# 6. chunked token log-probs -------------------------------------------------------------------


def test_token_logprobs_values_and_gradients():
    """Chunked log-probs (temperature 0.7, chunk 5 < N=13) and their gradients w.r.t. hidden and
    weight equal autograd through log_softmax(h @ W.T / T).gather, with a non-uniform upstream grad."""
    n, dim, vocab, temp = 13, 32, 50, 0.7
    h = torch.randn(n, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    upstream = torch.randn(n)

    ours = token_logprobs(h, w, targets, temperature=temp, chunk_tokens=5)
    gh, gw = torch.autograd.grad(ours, (h, w), upstream)
    ref = torch.log_softmax(h @ w.T / temp, dim=-1).gather(1, targets[:, None]).squeeze(1)
    rh, rw = torch.autograd.grad(ref, (h, w), upstream)
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=0)
    # only one input needing a gradient, and an empty batch
    (gh_only,) = torch.autograd.grad(token_logprobs(h, w.detach(), targets, temp, 5), (h,), upstream)
    torch.testing.assert_close(gh_only, rh, atol=1e-5, rtol=0)
    assert token_logprobs(h[:0], w, targets[:0]).shape == (0,)


def test_token_logprobs_bf16_autocast():
    """Under bf16 autocast on CPU, the model's chunked log-probs are fp32, close to the fp32 run
    within bf16 tolerance, and backpropagate fp32 gradients into fp32 weights."""
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (24,))
    ctx_lens = [10, 14]
    positions = torch.cat([torch.arange(n) for n in ctx_lens])
    targets = torch.randint(0, VOCAB, (24,))

    ref = model.token_logprobs(model(tokens, positions, AttnContext.packed(ctx_lens)), targets, 0.7, 7)
    ref.sum().backward()
    ref_grad = model.layers["0"].attention.wq.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.token_logprobs(model(tokens, positions, AttnContext.packed(ctx_lens)), targets, 0.7, 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.detach(), atol=5e-2, rtol=2e-2)
    out.sum().backward()
    grad = model.layers["0"].attention.wq.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.95
    # bf16 hidden states with fp32 weights, outside autocast
    h = torch.randn(9, 16)
    w = torch.randn(30, 16)
    t = torch.randint(0, 30, (9,))
    torch.testing.assert_close(token_logprobs(h.bfloat16(), w, t, chunk_tokens=4), token_logprobs(h, w, t),
                               atol=0.1, rtol=0.02)


def test_token_logprobs_tied_embeddings_gradient():
    """With tied embeddings (qwen2) the embedding matrix gets gradient from both its uses: as
    input embedding and as output projection; it equals autograd through full logits."""
    model = tiny_model("qwen2")
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, VOCAB // 2, (20,))  # upper half of the vocabulary never used as input
    targets = torch.randint(0, VOCAB, (20,))
    positions = torch.arange(20)

    h = model(tokens, positions, AttnContext.packed([20]))
    model.token_logprobs(h, targets, 0.7, 6).sum().backward()
    ours = model.tok_embeddings.weight.grad.clone()
    model.zero_grad()
    h = model(tokens, positions, AttnContext.packed([20]))
    torch.log_softmax(model.logits(h) / 0.7, -1).gather(1, targets[:, None]).sum().backward()
    torch.testing.assert_close(ours, model.tok_embeddings.weight.grad, atol=1e-5, rtol=0)
    # rows never used as input still get gradient (output use), and input rows get more than that
    assert ours[VOCAB // 2:].abs().sum(-1).min() > 0
    model.zero_grad()
    model.token_logprobs(h.detach(), targets, 0.7, 6).sum().backward()
    output_only = model.tok_embeddings.weight.grad
    assert not torch.allclose(ours[:VOCAB // 2], output_only[:VOCAB // 2])
    torch.testing.assert_close(ours[VOCAB // 2:], output_only[VOCAB // 2:], atol=1e-6, rtol=0)


# 7. value head --------------------------------------------------------------------------------


def test_value_head_matches_transformers_sequence_classification(tmp_path):
    """A value model returns [T] fp32 values; save_hf writes a *ForSequenceClassification config
    with num_labels=1 that transformers loads, and its score (at each row's last non-pad token)
    equals ours at each packed sequence's last token."""
    import transformers

    args = tiny_args("llama", head="value", extra={"model_type": "llama", "pad_token_id": 0})
    torch.manual_seed(0)
    model = Transformer(args).eval()
    assert model.output is None and model.score is not None
    lens = [11, 6]
    seqs = [torch.randint(1, VOCAB, (n,)) for n in lens]
    with torch.no_grad():
        values = model.values(torch.cat(forward_seqs(model, seqs)))
    assert values.shape == (sum(lens),) and values.dtype == torch.float32

    save_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config.get("num_labels", len(config["id2label"])) == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    padded = torch.zeros(2, max(lens), dtype=torch.long)  # right padding with pad_token_id 0
    attn = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, :len(s)], attn[i, :len(s)] = s, 1
    with torch.no_grad():
        ref = hf(padded, attention_mask=attn).logits
    assert ref.shape == (2, 1)
    ends = torch.tensor(lens).cumsum(0) - 1
    torch.testing.assert_close(values[ends], ref[:, 0], atol=1e-5, rtol=0)


def test_value_head_from_causal_lm(tmp_path):
    """load_hf(causal-LM folder, head="value") keeps the backbone (equal hidden states), drops
    the LM head and starts a zero value head."""
    lm = tiny_model("qwen2").eval()
    save_hf(lm, tmp_path)
    critic = load_hf(tmp_path, head="value").eval()
    assert critic.args.head == "value" and critic.output is None
    assert torch.equal(critic.score.weight, torch.zeros(1, lm.args.dim))
    seqs = [torch.randint(0, VOCAB, (n,)) for n in (7, 3)]
    for a, b in zip(forward_seqs(lm, seqs), forward_seqs(critic, seqs)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(critic.values(torch.cat(forward_seqs(critic, seqs))), torch.zeros(10))


# 8. structure for outside parallelism ---------------------------------------------------------


def test_module_names():
    """Every projection is its own module under the names tensor-parallel plans refer to."""
    model = tiny_model("llama")
    names = dict(model.named_modules())
    for i in range(model.args.n_layers):
        for sub in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            assert isinstance(names[f"layers.{i}.{sub}"], nn.Linear)
        assert model.layers[str(i)].attention.layer_id == i
    assert isinstance(names["tok_embeddings"], nn.Embedding) and isinstance(names["output"], nn.Linear)
    assert isinstance(model.layers, nn.ModuleDict)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_stages_compose(family):
    """Two pipeline stages cut from the model (layers removed, embeddings/norm/output set to None)
    compose to the full model: stage0(tokens) -> stage1(hidden) gives the same logits."""
    model = tiny_model(family, n_layers=4).eval()
    stage0, stage1 = copy.deepcopy(model), copy.deepcopy(model)
    for i in ("2", "3"):
        del stage0.layers[i]
    for i in ("0", "1"):
        del stage1.layers[i]
    stage0.norm = stage0.output = None
    stage1.tok_embeddings = None
    lens = [6, 11]
    tokens = torch.randint(0, VOCAB, (sum(lens),))
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        mid = stage0(tokens, positions, AttnContext.packed(lens))
        out = stage1.logits(stage1(mid, positions, AttnContext.packed(lens)))
        ref = model.logits(model(tokens, positions, AttnContext.packed(lens)))
    assert mid.shape == (sum(lens), model.args.dim)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # the stages keep their global layer ids, so they share one KV cache layout
    assert [blk.attention.layer_id for blk in stage1.layers.values()] == [2, 3]


def _shard_linear(linear: nn.Linear, rows: slice | None = None, cols: slice | None = None) -> nn.Linear:
    w = linear.weight.data
    w = w[rows] if rows is not None else w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data[rows] if rows is not None else linear.bias.data / 2)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tensor_parallel_attention_shards(family):
    """Attention split by hand like tensor parallelism (half the heads' rows of wq/wk/wv on each
    of two copies, the matching columns of wo, outputs summed) equals the unsharded attention:
    head counts come from the weight shapes, not the config."""
    model = tiny_model(family).eval()
    attn = model.layers["0"].attention
    a, d = model.args, model.args.head_dim
    assert a.n_heads % 2 == 0 and a.n_kv_heads % 2 == 0
    lens = [9, 4]
    x = torch.randn(sum(lens), a.dim)
    positions = torch.cat([torch.arange(n) for n in lens])
    cos, sin = model.rope(positions, x.dtype)
    with torch.no_grad():
        ref = attn(x, cos, sin, AttnContext.packed(lens))
        total = torch.zeros_like(ref)
        for r in range(2):
            shard = copy.deepcopy(attn)
            q_rows = slice(r * a.n_heads // 2 * d, (r + 1) * a.n_heads // 2 * d)
            kv_rows = slice(r * a.n_kv_heads // 2 * d, (r + 1) * a.n_kv_heads // 2 * d)
            shard.wq = _shard_linear(attn.wq, rows=q_rows)
            shard.wk = _shard_linear(attn.wk, rows=kv_rows)
            shard.wv = _shard_linear(attn.wv, rows=kv_rows)
            shard.wo = _shard_linear(attn.wo, cols=q_rows)
            total += shard(x, cos, sin, AttnContext.packed(lens))
    torch.testing.assert_close(total, ref, atol=1e-6, rtol=0)


def test_default_logprob_chunk_is_a_memory_budget():
    """0/None chunk size: as many tokens as fit 512 MiB of fp32 logits (hand-computed)."""
    from remesh.model.logprobs import default_chunk_tokens

    assert default_chunk_tokens(49152) == 512 * 1024**2 // (4 * 49152) == 2730
    assert default_chunk_tokens(151936) == 883
    assert default_chunk_tokens(10**12) == 1
