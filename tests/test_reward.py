"""remesh.reward: built-in rule rewards on hand examples, reasoning-gym answer checking, user
functions and their errors, RuleReward sums and error reporting, LearnedReward scoring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from remesh.reward import (
    BUILTIN_REWARDS,
    LearnedReward,
    LearnedRewardFn,
    RewardConfigError,
    RewardError,
    RewardFn,
    RewardTerm,
    RuleReward,
    RuleRewardFn,
    SumRewardFn,
    exact_answer,
    extract_answer,
    load_user_function,
    reasoning_gym_entry,
)
from remesh.reward import rules
from tests.models import tiny_model

REPO = Path(__file__).resolve().parents[1]


def call(name: str, response: str, answer: str | None = None, meta: dict | None = None, prompt: str = "q",
         **args) -> float:
    return rules.build_term_fn(RewardTerm(name, args=args))(prompt, response, answer, meta or {})


# ---------------------------------------------------------------- built-ins


def test_registry_names():
    assert set(BUILTIN_REWARDS) == {"exact_answer", "vader_sentiment", "length_penalty", "max_length_penalty",
                                    "format_penalty"}


def test_vader_sentiment_sign_and_shared_analyzer():
    pos = call("vader_sentiment", "I love this movie, it is wonderful and fun!")
    neg = call("vader_sentiment", "This was a terrible, boring and awful film.")
    assert -1.0 <= neg < 0.0 < pos <= 1.0
    assert call("vader_sentiment", "") == 0.0
    assert rules._vader() is rules._vader()  # built once, reused


@pytest.mark.parametrize("response, answer, expected", [
    ("The answer is 42.", "42", 1.0),
    ("Let me think: 40 + 2 = 42", "42", 1.0),
    ("42.0", "42", 1.0),  # numbers compare by exact decimal value: 42.0 == 42
    ("The total is 1,000 dollars.", "1000", 1.0),
    ("The total is 1000.", "1,000", 1.0),
    ("x = -5", "-5", 1.0),
    ("The answer is 41.", "42", 0.0),
    ("42 is close, but the answer is 43", "42", 0.0),  # the *last* number counts
    ("no number here", "42", 0.0),
    ("<answer>7</answer> and later 8", "7", 1.0),  # an <answer> tag wins
    (r"So the result is \boxed{12}. Check: 3 * 4 = 12, 13", "12", 1.0),
    ("Step 1...\nParis", "paris", 1.0),  # text: last non-empty line, case folded
    ("Thinking...\nAnswer:   New   York.", "new york", 1.0),  # text after "answer:", whitespace normalised
    ("The answer is **Paris**.", "Paris", 1.0),
    ("Some text\nThe capital is Paris.", "Paris", 0.0),  # last line is the whole sentence
    ("Answer: Lyon", "Paris", 0.0),
])
def test_exact_answer(response, answer, expected):
    assert exact_answer("q", response, answer, {}) == expected


def test_extract_answer():
    assert extract_answer("The answer is 42.", numeric=True) == "42"
    assert extract_answer("1,234,567 is it", numeric=True) == "1234567"
    assert extract_answer("just words", numeric=True) is None
    assert extract_answer("a\n\nfinal line  \n", numeric=False) == "final line"
    assert extract_answer("", numeric=False) is None


def test_exact_answer_needs_a_reference():
    with pytest.raises(ValueError, match="no reference 'answer'"):
        exact_answer("q", "42", None, {})


def test_length_penalties():
    words = " ".join(["w"] * 30)
    assert call("length_penalty", words) == pytest.approx(-0.2)  # defaults: target 50, scale 0.01
    assert call("length_penalty", words, target=30) == 0.0
    assert call("length_penalty", words, target=10, scale=0.5) == pytest.approx(-10.0)
    assert call("max_length_penalty", words, max_words=40) == 0.0
    assert call("max_length_penalty", words, max_words=20, scale=0.1) == pytest.approx(-1.0)


def test_format_penalty():
    pat = r"(?s)<think>.*</think>\s*<answer>.*</answer>"
    assert call("format_penalty", "<think>hm</think>\n<answer>4</answer>", pattern=pat) == 0.0
    assert call("format_penalty", "4", pattern=pat) == -1.0
    assert call("format_penalty", "4", pattern=pat, penalty=-0.5) == -0.5


def test_builtin_config_errors():
    with pytest.raises(RewardConfigError, match="missing a required argument: 'pattern'"):
        RuleReward([RewardTerm("format_penalty")])
    with pytest.raises(RewardConfigError, match="not a valid regex"):
        RuleReward([RewardTerm("format_penalty", args={"pattern": "(unclosed"})])
    with pytest.raises(RewardConfigError, match="unexpected keyword argument 'targte'.*target, scale"):
        RuleReward([RewardTerm("length_penalty", args={"targte": 3})])
    with pytest.raises(RewardConfigError, match="unknown reward 'exact_anser'; did you mean 'exact_answer'"):
        RuleReward([RewardTerm("exact_anser")])


# ---------------------------------------------------------------- reasoning-gym


@pytest.fixture(scope="module")
def rg_entries():
    reasoning_gym = pytest.importorskip("reasoning_gym")
    return {name: reasoning_gym.create_dataset(name, size=1, seed=0)[0] for name in ("chain_sum", "basic_arithmetic")}


def test_reasoning_gym_entry_forms(rg_entries):
    e = rg_entries["chain_sum"]
    assert reasoning_gym_entry("q", None, {"reasoning_gym": e}) == ("chain_sum", e)
    name, entry = reasoning_gym_entry(e["question"], e["answer"], dict(e["metadata"]))
    assert name == "chain_sum" and entry == {"question": e["question"], "answer": e["answer"], "metadata": e["metadata"]}
    assert reasoning_gym_entry("q", "1", {"metadata": e["metadata"]})[0] == "chain_sum"
    assert reasoning_gym_entry("q", "1", {"title": "x"}) is None


def test_reasoning_gym_scorer_path(rg_entries):
    for e in rg_entries.values():
        metas = [{"reasoning_gym": e}, dict(e["metadata"]), {"metadata": e["metadata"]}]
        for meta in metas:
            right = f"Working it out... the answer is {e['answer']}."
            assert exact_answer(e["question"], right, e["answer"], meta) == 1.0
            assert exact_answer(e["question"], f"<answer>{e['answer']}</answer>", e["answer"], meta) == 1.0
            assert exact_answer(e["question"], "the answer is 123456789123", e["answer"], meta) < 1.0
    # reasoning-gym's own checker applies, not ours: basic_arithmetic gives partial credit
    # len(oracle)/len(answer) for "<oracle>.0", where the plain numeric comparison gives 1.0.
    e = rg_entries["basic_arithmetic"]
    plain = exact_answer(e["question"], f"= {e['answer']}.0", e["answer"], {})
    rg = exact_answer(e["question"], f"= {e['answer']}.0", e["answer"], {"reasoning_gym": e})
    assert plain == 1.0 and 0.0 < rg < 1.0


def test_reasoning_gym_unknown_dataset_is_reported():
    pytest.importorskip("reasoning_gym")
    rr = RuleReward([RewardTerm("exact_answer")])
    with pytest.raises(RewardError, match="sample 0.*ValueError: Dataset 'no_such_set' not registered"):
        rr(["q"], ["1"], ["1"], [{"source_dataset": "no_such_set"}])


# ---------------------------------------------------------------- user functions


def _write(tmp_path: Path, text: str, name: str = "myreward.py") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_user_function(tmp_path):
    p = _write(tmp_path, "def shout(prompt, response, answer, meta, k=1.0):\n    return k * response.count('!')\n")
    fn = load_user_function(f"{p}:shout")
    assert fn("q", "hi!!", None, {}) == 2.0
    rr = RuleReward([RewardTerm(f"{p}:shout", weight=2.0, args={"k": 0.5})])
    assert rr(["q"], ["a!!!"], [None], [{}]) == [3.0]


def test_example_reward_fn():
    spec = f"{REPO / 'examples' / 'reward_fn.py'}:mentions_title"
    rr = RuleReward([RewardTerm(spec, args={"bonus": 2.0})])
    out = rr(["Review it"] * 3, ["Alien is a classic.", "A classic.", "Anything"], None,
             [{"title": "Alien"}, {"title": "Alien"}, {}])
    assert out == [2.0, 0.0, 0.0]


def test_load_user_function_errors(tmp_path):
    p = _write(tmp_path, "import os\nTHRESHOLD = 3\ndef good(p, r, a, m):\n    return 1.0\n"
                         "class Scorer:\n    pass\ndef _private():\n    pass\n")
    with pytest.raises(RewardConfigError, match=r"has no ':function' part; expected path/to/file.py:function"):
        load_user_function(str(p))
    with pytest.raises(RewardConfigError, match=r"has no ':function' part"):
        load_user_function(f"{p}:")
    with pytest.raises(RewardConfigError, match=r"no such file '.*missing\.py'"):
        load_user_function(f"{tmp_path / 'missing.py'}:fn")
    with pytest.raises(RewardConfigError, match=r"has no 'bad'; callables defined there: Scorer, good$"):
        load_user_function(f"{p}:bad")
    with pytest.raises(RewardConfigError, match=r"'THRESHOLD' is a int, not callable"):
        load_user_function(f"{p}:THRESHOLD")
    broken = _write(tmp_path, "def f(:\n", "broken.py")
    with pytest.raises(RewardConfigError, match=r"importing .*broken\.py' failed: SyntaxError"):
        load_user_function(f"{broken}:f")
    two = _write(tmp_path, "def two(prompt, response):\n    return 0.0\n", "two.py")
    with pytest.raises(RewardConfigError, match=r"cannot be called as fn\(prompt, response, answer, meta\)"):
        RuleReward([RewardTerm(f"{two}:two")])
    for msg_spec in (str(p), f"{p}:bad", f"{tmp_path / 'missing.py'}:fn"):
        with pytest.raises(RewardConfigError) as info:
            load_user_function(msg_spec)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- RuleReward


def test_rule_reward_weighted_sum_and_breakdown():
    terms = [RewardTerm("exact_answer", weight=2.0),
             RewardTerm("length_penalty", weight=0.5, args={"target": 3, "scale": 1.0}),
             RewardTerm("format_penalty", weight=1.0, args={"pattern": "answer"}),
             RewardTerm("format_penalty", weight=3.0, args={"pattern": "^The"})]
    rr = RuleReward(terms)
    out = rr(["q1", "q2"], ["The answer is 42", "It is 7"], ["42", "8"], [{}, {}])
    # sample 0: exact 1, words 4 -> -1, format ok 0, ^The ok 0  -> 2 - 0.5 = 1.5
    # sample 1: exact 0, words 3 -> 0, no 'answer' -1, no ^The -1 -> -1 - 3 = -4
    assert out == pytest.approx([1.5, -4.0])
    assert rr.breakdown == pytest.approx({"exact_answer": 0.5, "length_penalty": -0.5, "format_penalty#2": -0.5,
                                          "format_penalty#3": -0.5})


def test_raising_term_is_reported(tmp_path):
    p = _write(tmp_path, "def picky(prompt, response, answer, meta):\n"
                         "    if 'boom' in response:\n        raise ValueError('no field\\nhere')\n    return 1.0\n")
    rr = RuleReward([RewardTerm("length_penalty"), RewardTerm(f"{p}:picky")])
    long_prompt = "P" * 200
    with pytest.raises(RewardError) as info:
        rr(["short", long_prompt], ["fine", "it goes boom " + "x" * 200], None, None)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"reward term '{p}:picky' on sample 1" in msg
    assert "prompt='" + "P" * 77 + "...'" in msg and "P" * 78 not in msg
    assert "response='it goes boom x" in msg
    assert msg.endswith("raised ValueError: no field here")
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("value, shown", [("float('nan')", "returned nan"), ("float('inf')", "returned inf"),
                                           ("'1.0'", "returned a str"), ("None", "returned a NoneType")])
def test_non_finite_return_is_an_error(tmp_path, value, shown):
    p = _write(tmp_path, f"def f(prompt, response, answer, meta):\n    return {value} if response == 'b' else 1\n")
    rr = RuleReward([RewardTerm(f"{p}:f")])
    with pytest.raises(RewardError, match=rf"on sample 2 \(prompt='q', response='b'\) {shown}; expected a finite real"):
        rr(["q"] * 3, ["a", "a", "b"], None, None)


def test_rule_reward_length_mismatch():
    with pytest.raises(ValueError, match="lengths differ"):
        RuleReward([RewardTerm("vader_sentiment")])(["a"], ["b", "c"], None, None)


# ---------------------------------------------------------------- learned reward


@pytest.fixture(scope="module")
def value_model():
    return tiny_model("llama", head="value").eval()


def _sequences(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(0, 97, (k,), generator=g).tolist() for k in lens]


def test_learned_reward_matches_single_scoring_and_order(value_model):
    lr = LearnedReward(value_model)
    seqs = _sequences(9)
    alone = torch.stack([lr.score_tokens([s])[0] for s in seqs])
    batched = lr.score_tokens(seqs, micro_batch_tokens=64)  # several micro-batches
    assert batched.dtype == torch.float32 and batched.shape == (9,)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(lr.score_tokens([seqs[i] for i in perm], micro_batch_tokens=64), alone[perm],
                               rtol=1e-5, atol=1e-5)
    # a sequence longer than the budget is scored in a micro-batch of its own
    torch.testing.assert_close(lr.score_tokens(seqs, micro_batch_tokens=8), alone, rtol=1e-5, atol=1e-5)
    assert lr.score_tokens([]).shape == (0,)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        lr.score_tokens([[1, 2], []])


def test_learned_reward_needs_value_head():
    with pytest.raises(ValueError, match="value-head"):
        LearnedReward(tiny_model("llama"))


def test_reward_fns_combine(value_model):
    seqs = _sequences(4, seed=3)
    prompts = ["p"] * 4
    responses = ["one", "one two", "one two three", "a b c d"]
    learned = LearnedRewardFn(LearnedReward(value_model))
    rule = RuleRewardFn(RuleReward([RewardTerm("length_penalty", args={"target": 2, "scale": 1.0})]))
    both = SumRewardFn([learned, rule], weights=[1.0, 0.5])
    for fn in (learned, rule, both):
        assert isinstance(fn, RewardFn)
    r = both.score(prompts, responses, [None] * 4, [{}] * 4, seqs)
    expected = LearnedReward(value_model).score_tokens(seqs) + 0.5 * torch.tensor([-1.0, 0.0, -1.0, -2.0])
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-5)
    m = both.metrics()
    assert set(m) == {"learned", "length_penalty", "total"}
    assert m["length_penalty"] == pytest.approx(-1.0) and math.isclose(m["total"], float(expected.mean()), rel_tol=1e-5)


def test_learned_reward_retokenizes_texts(tmp_path):
    from tests.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path)
    model = tiny_model("llama", head="value", vocab_size=len(tok)).eval()
    lr = LearnedReward(model, tok)
    prompts, responses = ["What is the capital of France?", "Solve 12 + 30."], ["Paris.", "The answer is 42."]
    seqs = lr.tokenize(prompts, responses)
    # what the engine samples: the prompt, the response's text and the eos it stops at (not the
    # template's newline after it). Preference rows are rendered the same, so a reward model reads
    # its score at the token it was trained on, whether it scores ids or re-tokenised texts
    assert tok.eos_token == "<|im_end|>"
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for p in prompts]
    sampled = [p + tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for p, r in zip(prompt_ids, responses)]
    assert seqs == sampled
    fn = LearnedRewardFn(lr, retokenize=True)
    got = fn.score(prompts, responses, [None, None], [{}, {}], sequences=[[1], [2]])  # sequences ignored
    torch.testing.assert_close(got, lr.score_tokens(seqs))


def test_build_reward_fn_from_config(tmp_path):
    from types import SimpleNamespace

    from remesh.checkpoint import save_hf
    from remesh.reward import build_reward_fn
    from tests.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path)
    rm = tiny_model("llama", head="value", vocab_size=len(tok)).eval()
    save_hf(rm, tmp_path / "rm", tok)
    save_hf(tiny_model("llama", vocab_size=len(tok)), tmp_path / "lm", tok)
    terms = [SimpleNamespace(name="length_penalty", weight=2.0, args={"target": 1, "scale": 1.0})]

    rule_only = build_reward_fn(SimpleNamespace(model=None, terms=terms))
    assert isinstance(rule_only, RuleRewardFn)
    assert rule_only.score(["p"], ["a b c"], [None], [{}], None).tolist() == [-4.0]

    both = build_reward_fn(SimpleNamespace(model=str(tmp_path / "rm"), terms=terms), "cpu", policy_tokenizer=tok)
    assert isinstance(both, SumRewardFn) and both.fns[0].retokenize is False  # same tokenizer: ids are scored
    seqs = LearnedReward(rm, tok).tokenize(["p"], ["a b c"])
    got = both.score(["p"], ["a b c"], [None], [{}], seqs)
    torch.testing.assert_close(got, LearnedReward(rm).score_tokens(seqs) - 4.0)

    with pytest.raises(RewardConfigError, match="is a causal LM, not a reward model"):
        build_reward_fn(SimpleNamespace(model=str(tmp_path / "lm"), terms=[]))
    with pytest.raises(RewardConfigError, match="set reward.model"):
        build_reward_fn(SimpleNamespace(model=None, terms=[]))
