"""Prompt, SFT and preference datasets: read JSONL/parquet, validate every row, tokenise once.

Every problem is reported as a one-line `DataError` naming file, line (JSONL, 1-based) or
`row N` (parquet, 1-based) and field, e.g.
``data/sft.jsonl:17: field 'response': expected a string, got int``.
The whole file is validated before anything is returned, so a run never dies halfway through an
epoch on row 90 000. With ``skip_bad_rows=True`` bad rows are dropped instead and counted in a
`SkipReport` (a file where every row is bad is still an error).

Tokenisation (see `_Renderer`):
- with a chat template, the prompt is the user turn rendered with ``add_generation_prompt=True``
  and the response is what the full conversation adds to it, up to the eos that ends the turn
  (``<|im_end|>``; ChatML's newline after it is not the policy's to write). If the template
  does not render the prompt as a prefix of the conversation (some templates rewrite earlier
  turns), we fall back to prompt ids + tokenised response + eos.
- without a chat template, prompt ids = ``tokenizer(prompt)`` (with special tokens, e.g. bos) and
  response ids = ``tokenizer(response, add_special_tokens=False) + [eos]``.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # only for hints: keeps `import remesh.data` from importing transformers
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DataError",
    "SkipReport",
    "PromptExample",
    "SFTExample",
    "PreferenceExample",
    "load_prompt_dataset",
    "load_sft_dataset",
    "load_preference_dataset",
    "split_eval",
]

T = TypeVar("T")
ROLES = ("system", "user", "assistant")
_MAX_PLACES = 5  # how many bad-row places / messages a SkipReport keeps


class DataError(ValueError):
    """A problem with a data file; the message is one line naming file, line and field."""


@dataclass
class PromptExample:
    prompt_ids: list[int]
    prompt: str
    answer: str | None
    meta: dict[str, Any]
    source: str  # "data/x.jsonl:17" or "data/x.parquet:row 17"


@dataclass
class SFTExample:
    input_ids: list[int]
    # loss_mask[i]: token i is a response/assistant token that is trained on, i.e. the loss on
    # predicting input_ids[i] from position i-1. Always False at i == 0.
    loss_mask: list[bool]
    source: str


@dataclass
class PreferenceExample:
    chosen_ids: list[int]  # prompt + chosen response
    rejected_ids: list[int]  # prompt + rejected response
    prompt_len: int  # both sequences start with the same prompt_len prompt tokens
    source: str


@dataclass
class SkipReport:
    """What `skip_bad_rows=True` dropped from one file."""

    path: str
    total_rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped
    details: dict[str, str] = field(default_factory=dict)  # reason -> e.g. "max_len=256"
    first_at: dict[str, str] = field(default_factory=dict)  # reason -> "line 5" / "row 5"
    places: list[str] = field(default_factory=list)  # first few "file:line" of skipped rows
    messages: list[str] = field(default_factory=list)  # their full DataError messages

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        return self.total_rows - self.skipped

    def add(self, reason: str, detail: str | None, place: str, source: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first_at.setdefault(reason, place)
        if detail:
            self.details.setdefault(reason, detail)
        if len(self.places) < _MAX_PLACES:
            self.places.append(source)
            self.messages.append(message)

    def summary(self) -> str:
        """One line, e.g. `skipped 3 of 320 rows in x.jsonl: 2 prompt too long (max_prompt_len=64;
        first at line 12), 1 bad JSON (first at line 5)`."""
        if not self.counts:
            return f"skipped 0 of {self.total_rows} rows in {self.path}"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            extra = "; ".join(x for x in (self.details.get(reason), f"first at {self.first_at[reason]}") if x)
            parts.append(f"{n} {reason} ({extra})")
        return f"skipped {self.skipped} of {self.total_rows} rows in {self.path}: " + ", ".join(parts)


class _RowError(Exception):
    """A bad row; turned into DataError (or a SkipReport entry) by `_load`."""

    def __init__(self, reason: str, field: str | None, msg: str, detail: str | None = None):
        super().__init__(msg)
        self.reason, self.field, self.msg, self.detail = reason, field, msg, detail

    def format(self, source: str) -> str:
        where = f"field '{self.field}': " if self.field else ""
        return f"{source}: {where}{self.msg}"


# ---------------------------------------------------------------- reading


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice: json keeps the last one silently, and the first
    is lost data (a `response` written twice, an edit appended rather than replaced)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RowError("repeated key", key, "given twice in one object (JSON would keep the last silently)")
        out[key] = value
    return out


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for undecodable bytes


def _read_rows(path: Path) -> Iterator[tuple[str, str, Any]]:
    """Yield (place, source, row) per row; row is a _RowError for unparseable lines."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a .jsonl, .json or .parquet file")
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unknown file extension {suffix or '(none)'!r}; expected .jsonl, .json or .parquet")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        for i, row in enumerate(rows, 1):
            yield f"row {i}", f"{path}:row {i}", row
        return
    # -sig: tolerate a BOM; a byte that is not UTF-8 comes through as a lone surrogate, so that it
    # is its line's error (skippable), not the whole file's
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            row: Any
            if (bad := _NOT_UTF8.search(line)) is not None:
                row = _RowError("not UTF-8", None, f"not UTF-8 text (byte 0x{ord(bad[0]) - 0xDC00:02x} "
                                                   f"at column {bad.start() + 1})")
            elif not line.strip():
                continue
            else:
                try:
                    # so an error's column is on this line
                    row = json.loads(line.rstrip("\r\n"), object_pairs_hook=_object_without_repeats)
                except json.JSONDecodeError as e:
                    array = lineno == 1 and line.strip() == "["
                    hint = " (files are read as JSON Lines: one object per line)" if array else ""
                    row = _RowError("bad JSON", None, f"bad JSON: {e.msg} at column {e.colno}{hint}")
                except _RowError as e:
                    row = e
            yield f"line {lineno}", f"{path}:{lineno}", row


def _load(path: str | Path, parse: Callable[[dict[str, Any], str], T], skip_bad_rows: bool) -> tuple[list[T], SkipReport]:
    """Validate and parse every row of `path` before returning anything."""
    path = Path(path)
    report = SkipReport(path=str(path))
    out: list[T] = []
    for place, source, row in _read_rows(path):
        report.total_rows += 1
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError("not an object", None, f"expected a JSON object, got {_type_name(row)}")
            out.append(parse(row, source))
        except _RowError as e:
            if not skip_bad_rows:
                raise DataError(e.format(source)) from None
            report.add(e.reason, e.detail, place, source, e.format(source))
    if report.total_rows == 0:
        raise DataError(f"{path}: empty file (no rows)")
    if not out:
        raise DataError(f"{path}: every row is bad: {report.summary()}")
    return out, report


# ---------------------------------------------------------------- field validation


def _known_fields(row: Mapping[str, Any], fields: tuple[str, ...], what: str, prefix: str = "") -> None:
    """A field the loader would not read is an error, not silently dropped data (a `system`
    next to prompt + response, a `margin` on a preference pair); `meta` holds bookkeeping. A null
    is no value (parquet gives every row every column)."""
    for key, value in row.items():
        if key not in fields and value is not None:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            keep = "; put other data under 'meta'" if "meta" in fields else ""
            raise _RowError("unknown field", f"{prefix}{key}",
                            f"unknown field ({hint}{what} have {', '.join(fields)}{keep})")


def _str_field(row: Mapping[str, Any], key: str, name: str | None = None) -> str:
    """Required non-empty string. `name` is how the field is called in messages."""
    name = name or key
    v = row.get(key)
    if v is None:  # missing, JSON null, or parquet null all mean "not given"
        raise _RowError("missing field", name, "missing" if key not in row else "missing (null)")
    if not isinstance(v, str):
        raise _RowError("wrong type", name, f"expected a string, got {_type_name(v)}")
    if not v.strip():
        raise _RowError("empty string", name, "empty string")
    return v


def _messages_field(row: Mapping[str, Any]) -> list[dict[str, str]]:
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise _RowError("wrong type", "messages", f"expected a list of messages, got {_type_name(msgs)}")
    if not msgs:
        raise _RowError("empty string", "messages", "empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise _RowError("wrong type", f"messages[{i}]", f"expected an object with role and content, got {_type_name(m)}")
        _known_fields(m, ("role", "content"), "messages", f"messages[{i}].")
        role = _str_field(m, "role", f"messages[{i}].role")
        if role not in ROLES:
            raise _RowError("bad role", f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": _str_field(m, "content", f"messages[{i}].content")})
    if not any(m["role"] == "assistant" for m in out):
        raise _RowError("no assistant turn", "messages", "no assistant turn (need at least one to train on)")
    return out


def _check_prompt_len(n: int, max_prompt_len: int, name: str = "prompt",
                      option: str = "data.max_prompt_len") -> None:
    if n > max_prompt_len:
        raise _RowError(
            "prompt too long", name,
            f"prompt is {n} tokens, longer than max_prompt_len={max_prompt_len} (raise {option} or shorten it)",
            f"max_prompt_len={max_prompt_len}",
        )


def _check_len(prompt_len: int, total: int, max_len: int, name: str) -> None:
    if total > max_len:
        raise _RowError(
            "sequence too long", name,
            f"sequence is {total} tokens (prompt {prompt_len} + response {total - prompt_len}), "
            f"longer than max_len={max_len} (raise data.max_len or shorten it)",
            f"max_len={max_len}",
        )


# ---------------------------------------------------------------- tokenisation


def _as_ids(x: Any) -> list[int]:
    """Plain list[int] from whatever a tokenizer call returned (list, BatchEncoding/dict, tensor,
    or a batch of one)."""
    if isinstance(x, Mapping) or hasattr(x, "input_ids"):
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    x = list(x)
    if x and isinstance(x[0], (list, tuple)):
        assert len(x) == 1, "expected a single sequence"
        x = list(x[0])
    return [int(t) for t in x]


class _Renderer:
    """Turns prompts/conversations into token ids with per-token loss masks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        if not self.chat and self.eos is None:
            raise ValueError("tokenizer has neither a chat template nor an eos token; cannot mark the end of a response")

    def encode(self, text: str, special: bool) -> list[int]:
        return _as_ids(self.tok(text, add_special_tokens=special))

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        try:
            out = self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        except Exception as e:  # templates raise on conversations they reject (e.g. roles not alternating)
            raise _RowError("chat template error", None, f"chat template failed: {e}") from None
        return _as_ids(out)

    def _eos(self) -> list[int]:
        return [self.eos] if self.eos is not None else []

    def prompt(self, prompt: str) -> list[int]:
        if self.chat:
            return self.render([{"role": "user", "content": prompt}], True)
        return self.encode(prompt, True)

    def _turn_end(self, piece: list[int]) -> int:
        """Where the assistant turn rendered in `piece` ends: after its eos. What a template writes
        after it (ChatML's newline) is not the policy's to write: a sampled response stops at
        the eos, and a reward model must read its score there in training as in RL."""
        return len(piece) - piece[::-1].index(self.eos) if self.eos in piece else len(piece)

    def response(self, prompt: str, prompt_ids: list[int], response: str) -> list[int]:
        """Response ids that follow `prompt_ids` (= self.prompt(prompt)), up to the turn's eos."""
        if self.chat:
            full = self.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], False)
            if full[: len(prompt_ids)] == prompt_ids:
                ids = full[len(prompt_ids):]
                return ids[: self._turn_end(ids)]
            # Template does not extend the prompt rendering token-for-token: use the fallback.
        return self.encode(response, False) + self._eos()

    def messages(self, msgs: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """Conversation ids with loss on assistant turns only, each up to its eos. Turns after the
        last assistant turn carry no loss and are dropped, as is the template's tail after it."""
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        msgs = msgs[: last + 1]
        if not self.chat:
            # No template: plain concatenation of contents (no role markers); special tokens
            # (e.g. bos) only before the first turn, eos after each assistant turn.
            ids: list[int] = []
            mask: list[bool] = []
            for m in msgs:
                if m["role"] == "assistant":
                    piece = self.encode(m["content"], False) + self._eos()
                else:
                    piece = self.encode(m["content"], not ids)
                ids += piece
                mask += [m["role"] == "assistant"] * len(piece)
            return ids, mask
        # Render incrementally: the prefix up to each assistant turn (with generation prompt) is
        # context, what that turn then adds is trained on.
        ids, mask = [], []
        keep = 0  # up to the last assistant turn's eos
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            context = self.render(msgs[:i], True)
            turn = self.render(msgs[: i + 1], False)
            if context[: len(ids)] != ids or turn[: len(context)] != context:
                break  # template rewrites earlier turns (e.g. drops old reasoning): see below
            end = self._turn_end(turn[len(context):])
            mask += [False] * (len(context) - len(ids)) + [True] * end + [False] * (len(turn) - len(context) - end)
            ids, keep = turn, len(context) + end
        else:
            return ids[:keep], mask[:keep]
        # Non-incremental template: train the last assistant turn only, on the final rendering.
        context = self.render(msgs[:last], True)
        turn = self.render(msgs, False)
        resp = turn[len(context):] if turn[: len(context)] == context else self.encode(msgs[last]["content"], False) + self._eos()
        resp = resp[: self._turn_end(resp)]
        return context + resp, [False] * len(context) + [True] * len(resp)


def prompt_response_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> list[int]:
    """Prompt + response ids as SFT and preference rows render them: the chat template when the
    tokenizer has one, the response up to the eos that ends its turn."""
    r = _Renderer(tokenizer)
    ids = r.prompt(prompt)
    return ids + r.response(prompt, ids, response)


# ---------------------------------------------------------------- loaders


def load_prompt_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int, skip_bad_rows: bool = False,
    limit_option: str = "data.max_prompt_len", unscorable: Callable[[PromptExample], str | None] | None = None,
) -> tuple[list[PromptExample], SkipReport]:
    """Rows: `prompt` (str), optional `answer` (str or number, kept as str), optional `meta`
    (object); any other keys are merged into meta. `limit_option`: how an error names the
    setting that raises `max_prompt_len`. `unscorable`: why the run's reward could not score a
    row (None: it can); such a row is a bad row like a malformed one."""
    r = _Renderer(tokenizer)

    def parse(row: dict[str, Any], source: str) -> PromptExample:
        prompt = _str_field(row, "prompt")
        answer = row.get("answer")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise _RowError("wrong type", "answer", f"expected a string or number, got {_type_name(answer)}")
            answer = str(answer)
        meta = row.get("meta")
        if meta is None:
            meta = {}
        elif not isinstance(meta, dict):
            raise _RowError("wrong type", "meta", f"expected an object, got {_type_name(meta)}")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "meta")}
        for k in extra.keys() & meta.keys():
            if extra[k] is not None and extra[k] != meta[k]:  # None: a parquet column this row leaves empty
                raise _RowError("conflicting fields", k, f"given both at the top level ({extra[k]!r}) and in meta "
                                f"({meta[k]!r})")
        meta = {**extra, **meta}
        ids = r.prompt(prompt)
        _check_prompt_len(len(ids), max_prompt_len, option=limit_option)
        example = PromptExample(ids, prompt, answer, meta, source)
        if unscorable is not None and (why := unscorable(example)) is not None:
            raise _RowError("unscorable", None, why)
        return example

    return _load(path, parse, skip_bad_rows)


def load_sft_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int, max_len: int, skip_bad_rows: bool = False
) -> tuple[list[SFTExample], SkipReport]:
    """Rows: `prompt` + `response`, or chat `messages` ([{role, content}], role in system/user/
    assistant, at least one assistant turn; loss on every assistant turn). For messages,
    max_prompt_len applies to the context before the first assistant turn."""
    r = _Renderer(tokenizer)

    def parse(row: dict[str, Any], source: str) -> SFTExample:
        _known_fields(row, ("prompt", "response", "messages", "meta"), "SFT rows")
        if row.get("messages") is not None:  # None: absent, or a parquet column this row leaves empty
            if row.get("prompt") is not None or row.get("response") is not None:
                raise _RowError("conflicting fields", "messages", "give either messages or prompt + response, not both")
            ids, mask = r.messages(_messages_field(row))
            if not any(mask):
                raise _RowError("no assistant turn", "messages", "chat template rendered no assistant tokens")
            first = mask.index(True)
            _check_prompt_len(first, max_prompt_len, "messages")
            _check_len(first, len(ids), max_len, "messages")
            return SFTExample(ids, mask, source)
        prompt, response = _str_field(row, "prompt"), _str_field(row, "response")
        p = r.prompt(prompt)
        _check_prompt_len(len(p), max_prompt_len)
        resp = r.response(prompt, p, response)
        _check_len(len(p), len(p) + len(resp), max_len, "response")
        return SFTExample(p + resp, [False] * len(p) + [True] * len(resp), source)

    return _load(path, parse, skip_bad_rows)


def load_preference_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_prompt_len: int, max_len: int, skip_bad_rows: bool = False
) -> tuple[list[PreferenceExample], SkipReport]:
    """Rows: `prompt`, `chosen`, `rejected` (strings, chosen != rejected)."""
    r = _Renderer(tokenizer)

    def parse(row: dict[str, Any], source: str) -> PreferenceExample:
        _known_fields(row, ("prompt", "chosen", "rejected", "meta"), "preference rows")
        prompt, chosen, rejected = (_str_field(row, k) for k in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise _RowError("chosen equals rejected", "rejected", "identical to 'chosen'")
        p = r.prompt(prompt)
        _check_prompt_len(len(p), max_prompt_len)
        c, rj = r.response(prompt, p, chosen), r.response(prompt, p, rejected)
        _check_len(len(p), len(p) + len(c), max_len, "chosen")
        _check_len(len(p), len(p) + len(rj), max_len, "rejected")
        return PreferenceExample(p + c, p + rj, len(p), source)

    return _load(path, parse, skip_bad_rows)


def split_eval(examples: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic random split into (train, eval), each keeping the original order.
    eval gets round(n * eval_fraction) rows, at least 1 when eval_fraction > 0 and n >= 2, and
    train keeps at least 1."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = 0
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    eval_idx = set(random.Random(seed).sample(range(n), n_eval))
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    evals = [e for i, e in enumerate(examples) if i in eval_idx]
    return train, evals
