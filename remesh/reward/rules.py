"""Rule-based rewards: built-in reward functions, user functions from files, and their weighted sum.

A reward function is ``fn(prompt: str, response: str, answer: str | None, meta: dict) -> float``:
``answer`` and ``meta`` are the prompt row's (see ``remesh.data.load_prompt_dataset``).

Built-ins (``BUILTIN_REWARDS``; keyword parameters come from a term's ``args``):

- ``exact_answer``: 1.0 if the final answer extracted from the response equals the reference,
  else 0.0; rows from reasoning-gym are scored by reasoning-gym's own checker instead (see
  ``exact_answer``).
- ``vader_sentiment``: VADER compound score of the response, in [-1, 1].
- ``length_penalty(target=50, scale=0.01)``: ``-scale * |n_words - target|``.
- ``max_length_penalty(max_words=200, scale=0.01)``: ``-scale * max(0, n_words - max_words)``
  (only over-long responses are penalised).
- ``format_penalty(pattern, penalty=-1.0)``: ``penalty`` unless ``re.search(pattern, response)``
  matches, else 0. Use inline flags for options, e.g. ``(?s)`` or ``(?i)``.

Words are ``response.split()`` (whitespace-separated). A term's name is either a built-in name
or ``path/to/file.py:function`` (loaded by ``load_user_function``; its ``args`` are bound as
keyword arguments too). ``RuleReward`` sums weighted terms and keeps a per-term breakdown; a
term that raises, or returns anything but a finite real number, stops the call with a one-line
``RewardError`` naming the term and the sample.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from remesh.config import ConfigError

RewardFunc = Callable[[str, str, "str | None", dict], float]


class RewardError(RuntimeError):
    """A reward term failed on a sample (raised, or returned a non-finite / non-number value)."""


class RewardConfigError(ConfigError):
    """A reward term cannot be built: unknown name, bad arguments, bad `file.py:function` spec."""


# ---------------------------------------------------------------- answer extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
# A number: optional sign (not right after a word character or a closing bracket, so "3-4" is
# 3 and 4, "x=-4" is -4), thousands groups "1,234,567" or plain digits, decimals, exponent.
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-+])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*(.*)", re.IGNORECASE)
_STRIP_CHARS = " \t\n\r.,;:!\"'`*"


def parse_number(text: str | None) -> Decimal | None:
    """`text` as an exact Decimal ("1,000" -> 1000, "+42.0" -> 42.0, "4.2e1" -> 42), or None."""
    if text is None:
        return None
    s = text.strip().replace("\u2212", "-")
    if "," in s:
        if not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
            return None
        s = s.replace(",", "")
    if not re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", s):
        return None  # Decimal would also take "NaN", "Infinity", "1_000"
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return d


def normalize_text(text: str) -> str:
    """Comparison form of a text answer: whitespace collapsed, case folded, and surrounding
    punctuation / quotes / markdown emphasis (``.,;:!"'`*``) stripped: "**Paris.**" -> "paris"."""
    return " ".join(text.split()).casefold().strip(_STRIP_CHARS)


def extract_answer(response: str, numeric: bool) -> str | None:
    """The final answer in a response, or None when there is none.

    1. The candidate text is the content of the last ``<answer>...</answer>`` tag, else of the
       last ``\\boxed{...}``, else the whole response.
    2. numeric (the reference is a number): the last number in the candidate (thousands commas
       removed), None if it holds no number.
    3. text: a tag's content as is; otherwise what follows the last "answer:" / "answer is" (to
       the end of that line), else the last non-empty line of the response.
    """
    text = response.replace("\u2212", "-")
    tagged = _ANSWER_TAG.findall(text) or _BOXED.findall(text)
    candidate = tagged[-1].strip() if tagged else text
    if numeric:
        nums = _NUMBER.findall(candidate)
        return nums[-1].replace(",", "") if nums else None
    if tagged:
        return candidate
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases and phrases[-1].strip():
        return phrases[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def answers_match(extracted: str | None, answer: str) -> bool:
    """Numeric references compare by exact decimal value ("42.0" == "42" == "42.00", "1,000" ==
    "1000"); others by ``normalize_text``."""
    if extracted is None:
        return False
    ref = parse_number(answer)
    if ref is not None:
        got = parse_number(extracted)
        return got is not None and got == ref
    return normalize_text(extracted) == normalize_text(answer)


# ---------------------------------------------------------------- reasoning-gym rows


def reasoning_gym_entry(prompt: str, answer: str | None, meta: dict) -> tuple[str, dict] | None:
    """(dataset name, entry) when the row came from reasoning-gym, else None. Recognised rows:

    - ``meta["reasoning_gym"]``: the entry as ``reasoning_gym.create_dataset`` yields it
      (``{"question", "answer", "metadata": {"source_dataset": ...}}``);
    - ``meta["source_dataset"]``: meta *is* the entry's metadata (a row written as
      ``{"prompt": e["question"], "answer": e["answer"], "meta": e["metadata"]}``);
    - ``meta["metadata"]["source_dataset"]``: the same with the metadata under a "metadata" key.

    In the last two the entry is rebuilt as ``{"question": prompt, "answer": answer, "metadata": ...}``.
    """
    rg = meta.get("reasoning_gym")
    if isinstance(rg, dict):
        md = rg.get("metadata") or {}
        name = md.get("source_dataset") or rg.get("source_dataset")
        if not name:
            raise ValueError("meta['reasoning_gym'] has no metadata.source_dataset naming its dataset")
        entry = dict(rg)
        if entry.get("answer") is None and answer is not None:
            entry["answer"] = answer
        entry.setdefault("question", prompt)
        return str(name), entry
    if "source_dataset" in meta:
        return str(meta["source_dataset"]), {"question": prompt, "answer": answer, "metadata": meta}
    md = meta.get("metadata")
    if isinstance(md, dict) and "source_dataset" in md:
        return str(md["source_dataset"]), {"question": prompt, "answer": answer, "metadata": md}
    return None


@functools.lru_cache(maxsize=None)
def _reasoning_gym_scorer(name: str) -> Callable[..., float]:
    """reasoning-gym's ``score_answer`` for a dataset, built once per name (the package imports in ~2 s)."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(f"this row comes from reasoning-gym dataset {name!r} but the reasoning-gym package "
                          f"is not installed (pip install reasoning-gym)") from e
    return reasoning_gym.get_score_answer_fn(name)


# ---------------------------------------------------------------- built-ins


NO_REFERENCE = "the row has no reference 'answer' (and meta holds no reasoning-gym entry)"


ROW_CHECKED_TERMS = frozenset({"exact_answer"})  # built-ins that need something of every prompt row


def why_unscorable(term: str, prompt: str, answer: str | None, meta: dict) -> str | None:
    """Why the built-in `term` could not score any response to this prompt row (None: it can),
    so that a prompts file is refused when it loads, not after a rollout."""
    if term not in ROW_CHECKED_TERMS:
        return None
    try:
        return None if reasoning_gym_entry(prompt, answer, meta) is not None or answer is not None else NO_REFERENCE
    except ValueError as e:  # a malformed reasoning-gym entry
        return str(e)


def exact_answer(prompt: str, response: str, answer: str | None, meta: dict) -> float:
    """1.0 if the response's final answer equals the reference, else 0.0.

    Plain rows: ``extract_answer`` (numeric when the reference parses as a number) then
    ``answers_match`` -- numbers compare by exact decimal value, so "42.0" and "1,000" match
    "42" and "1000"; text compares after ``normalize_text``. A row with no ``answer`` raises.

    reasoning-gym rows (``reasoning_gym_entry``): the answer is extracted the same way (numeric
    when the entry's answer is a number; an ``<answer>`` tag wins, as in reasoning-gym's own
    prompts) and scored by ``reasoning_gym.get_score_answer_fn(dataset)(answer=extracted,
    entry=entry)``, i.e. the dataset's own checker, which may give partial credit in [0, 1]
    (e.g. basic_arithmetic gives len(oracle)/len(answer) when the oracle is a substring).
    """
    rg = reasoning_gym_entry(prompt, answer, meta)
    if rg is not None:
        name, entry = rg
        ref = entry.get("answer")
        extracted = extract_answer(response, numeric=isinstance(ref, str) and parse_number(ref) is not None)
        return float(_reasoning_gym_scorer(name)(answer=extracted, entry=entry))
    if answer is None:
        raise ValueError(NO_REFERENCE)
    answer = str(answer)
    extracted = extract_answer(response, numeric=parse_number(answer) is not None)
    return 1.0 if answers_match(extracted, answer) else 0.0


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()  # reads its lexicon from the package, once


def vader_sentiment(prompt: str, response: str, answer: str | None, meta: dict) -> float:
    """VADER compound sentiment of the response in [-1, 1] (0 for an empty response). The
    analyzer is built on first use and shared."""
    return float(_vader().polarity_scores(response)["compound"])


def length_penalty(prompt: str, response: str, answer: str | None, meta: dict, *, target: int = 50,
                   scale: float = 0.01) -> float:
    """-scale * |n_words - target| (n_words = len(response.split()))."""
    return -scale * abs(len(response.split()) - target)


def max_length_penalty(prompt: str, response: str, answer: str | None, meta: dict, *, max_words: int = 200,
                       scale: float = 0.01) -> float:
    """-scale * max(0, n_words - max_words): only responses longer than max_words are penalised."""
    return -scale * max(0, len(response.split()) - max_words)


def format_penalty(prompt: str, response: str, answer: str | None, meta: dict, *, pattern: str,
                   penalty: float = -1.0) -> float:
    """``penalty`` if ``re.search(pattern, response)`` finds no match, else 0.0."""
    return 0.0 if re.search(pattern, response) else float(penalty)


BUILTIN_REWARDS: dict[str, Callable[..., float]] = {
    "exact_answer": exact_answer,
    "vader_sentiment": vader_sentiment,
    "length_penalty": length_penalty,
    "max_length_penalty": max_length_penalty,
    "format_penalty": format_penalty,
}


def _validate_format_penalty(args: dict) -> None:
    try:
        re.compile(args["pattern"])
    except (re.error, TypeError) as e:
        raise ValueError(f"pattern {args['pattern']!r} is not a valid regex ({e})") from None


_VALIDATORS: dict[str, Callable[[dict], None]] = {"format_penalty": _validate_format_penalty}


# ---------------------------------------------------------------- user functions


def load_user_function(spec: str) -> Callable[..., float]:
    """The callable named by ``path/to/file.py:function`` (path relative to the working
    directory). The file is imported by path as its own module. Raises RewardConfigError (one
    line) when the spec has no ``:function`` part, the file does not exist or fails to import,
    the name is not in the file (the file's callables are listed), or it is not callable."""
    path_text, sep, func_name = spec.rpartition(":")
    if not sep or not path_text or not func_name.strip():
        raise RewardConfigError(f"reward function {spec!r} has no ':function' part; expected path/to/file.py:function")
    func_name = func_name.strip()
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise RewardConfigError(f"reward function {spec!r}: no such file {str(path)!r}"
                                + (" (it is a directory)" if path.is_dir() else ""))
    resolved = path.resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    mod_name = f"remesh_user_reward_{stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise RewardConfigError(f"reward function {spec!r}: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module  # dataclasses / pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise RewardConfigError(f"reward function {spec!r}: importing {str(path)!r} failed: "
                                f"{type(e).__name__}: {e}") from e
    if not hasattr(module, func_name):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == mod_name)
        raise RewardConfigError(f"reward function {spec!r}: {str(path)!r} has no {func_name!r}; "
                                f"callables defined there: {', '.join(found) if found else '(none)'}")
    fn = getattr(module, func_name)
    if not callable(fn):
        raise RewardConfigError(f"reward function {spec!r}: {func_name!r} is a {type(fn).__name__}, not callable")
    return fn


# ---------------------------------------------------------------- terms and their sum


@dataclass
class RewardTerm:
    """One weighted term: ``name`` is a built-in (``BUILTIN_REWARDS``) or ``path/to/file.py:function``;
    ``args`` are keyword arguments bound to the function."""

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


def build_term_fn(term: RewardTerm) -> Callable[[str, str, str | None, dict], float]:
    """The term's function with its args bound (functools.partial). Unknown names, unknown or
    missing arguments and invalid regexes raise RewardConfigError at build time, not mid-run."""
    name = term.name
    if name in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[name]
    elif ":" in name or name.endswith(".py"):
        fn = load_user_function(name)
    else:
        close = difflib.get_close_matches(name, list(BUILTIN_REWARDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RewardConfigError(f"unknown reward {name!r}; {hint}built-ins: {', '.join(BUILTIN_REWARDS)}; "
                                f"or a path/to/file.py:function")
    args = dict(term.args or {})
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None  # builtins / C callables: cannot check, bind as given
    if sig is not None:
        try:
            sig.bind("", "", None, {}, **args)
        except TypeError as e:
            params = [p for i, p in enumerate(sig.parameters) if i >= 4]
            call = ", ".join(["prompt", "response", "answer", "meta"] + [f"{k}={v!r}" for k, v in args.items()])
            raise RewardConfigError(f"reward {name!r} cannot be called as fn({call}): {e} "
                                    f"(its extra parameters: {', '.join(params) if params else 'none'})") from None
    if name in _VALIDATORS:
        try:
            _VALIDATORS[name](args)
        except ValueError as e:
            raise RewardConfigError(f"reward {name!r}: {e}") from None
    return functools.partial(fn, **args) if args else fn


def _short(text: str, n: int = 80) -> str:
    text = str(text)
    return repr(text if len(text) <= n else text[: n - 3] + "...")


class RuleReward:
    """Weighted sum of reward terms. ``__call__`` returns one float per sample; ``breakdown``
    maps each term's key (its name; ``name#i`` for the i-th term when names repeat) to the mean
    of its *unweighted* value over the last call."""

    def __init__(self, terms: Sequence[RewardTerm]):
        if not terms:
            raise RewardConfigError("a rule reward needs at least one term")
        self.terms = list(terms)
        self.fns = [build_term_fn(t) for t in self.terms]
        names = [t.name for t in self.terms]
        self.keys = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.weights = [float(t.weight) for t in self.terms]
        self.breakdown: dict[str, float] = {}

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None] | None = None,
                 metas: Sequence[dict] | None = None) -> list[float]:
        n = len(responses)
        answers = [None] * n if answers is None else answers
        metas = [{}] * n if metas is None else metas
        if not (len(prompts) == len(answers) == len(metas) == n):
            raise ValueError(f"lengths differ: {len(prompts)} prompts, {n} responses, {len(answers)} answers, "
                             f"{len(metas)} metas")
        totals = [0.0] * n
        sums = [0.0] * len(self.fns)
        for i in range(n):
            meta = metas[i] if metas[i] is not None else {}
            for j, (key, fn, w) in enumerate(zip(self.keys, self.fns, self.weights)):
                where = f"reward term {key!r} on sample {i} (prompt={_short(prompts[i])}, response={_short(responses[i])})"
                try:
                    v = fn(prompts[i], responses[i], answers[i], meta)
                except Exception as e:
                    msg = " ".join(str(e).split())
                    raise RewardError(f"{where} raised {type(e).__name__}: {msg}") from e
                if not isinstance(v, numbers.Real) or not math.isfinite(v):
                    got = repr(v) if isinstance(v, numbers.Real) else f"a {type(v).__name__}"
                    raise RewardError(f"{where} returned {got}; expected a finite real number")
                v = float(v)
                sums[j] += v
                totals[i] += w * v
        self.breakdown = {k: s / n for k, s in zip(self.keys, sums)} if n else {}
        return totals
