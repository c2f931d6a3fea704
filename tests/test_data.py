from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from remesh.data import (
    DataError,
    PreferenceExample,
    load_preference_dataset,
    load_prompt_dataset,
    load_sft_dataset,
    split_eval,
)
from tests.tiny_tokenizer import tiny_tokenizer

BIG = 10_000  # limits that never trigger


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), chat_template=True)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), chat_template=False)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """rows: objects are JSON-encoded, strings are written verbatim (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sft(path, tok, **kw):
    kw = {"max_prompt_len": BIG, "max_len": BIG, **kw}
    return load_sft_dataset(path, tok, **kw)


def trained_text(tok, ids: list[int], mask: list[bool]) -> str:
    return tok.decode([t for t, m in zip(ids, mask) if m])


GOOD = {"prompt": "What is 2+2?", "response": "4"}


# ---------------------------------------------------------------- bad input: one test per class


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"prompt": "x", ', r"x\.jsonl:3: bad JSON: "),
        ("[1, 2]", r"x\.jsonl:3: expected a JSON object, got list"),
        ({"prompt": "hi"}, r"x\.jsonl:3: field 'response': missing$"),
        ({"prompt": "hi", "response": None}, r"x\.jsonl:3: field 'response': missing \(null\)"),
        ({"prompt": "hi", "response": 5}, r"x\.jsonl:3: field 'response': expected a string, got int"),
        ({"prompt": "  ", "response": "a"}, r"x\.jsonl:3: field 'prompt': empty string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"x\.jsonl:3: field 'messages': no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
            r"x\.jsonl:3: field 'messages\[1\]\.role': expected one of system, user, assistant, got 'bot'",
        ),
        ({"messages": [{"role": "user"}]}, r"x\.jsonl:3: field 'messages\[0\]\.content': missing"),
        ({"messages": "hi"}, r"x\.jsonl:3: field 'messages': expected a list"),
        ({"prompt": "hi", "response": "a", "system": "be terse"},
         r"x\.jsonl:3: field 'system': unknown field \(SFT rows have prompt, response, messages, meta; put other"),
        ({"prompt": "hi", "respons": "a"}, r"x\.jsonl:3: field 'respons': unknown field \(did you mean 'response'\?"),
        ({"messages": [{"role": "user", "content": "hi", "weight": 2}, {"role": "assistant", "content": "yo"}]},
         r"x\.jsonl:3: field 'messages\[0\]\.weight': unknown field \(messages have role, content\)"),
        ('{"prompt": "hi", "response": "a", "response": "b"}',
         r"x\.jsonl:3: field 'response': given twice in one object \(JSON would keep the last silently\)"),
    ],
)
def test_bad_row_names_file_line_field(tmp_path, tok, line, pattern):
    # Line 2 is blank: line numbers count it (they are the file's own line numbers).
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError, match=pattern) as e:
        sft(path, tok)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_bad_json_column_is_on_its_line(tmp_path, tok):
    """The column of a JSON error points into the line, not past its newline."""
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, '{"prompt": "a" "response": "b"}'])
    with pytest.raises(DataError, match=r"x\.jsonl:2: bad JSON: Expecting ',' delimiter at column 16$"):
        sft(path, tok)


def test_bad_row_is_found_before_anything_returns(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD] * 50 + [{"prompt": "p", "response": 1}])
    with pytest.raises(DataError, match=r"x\.jsonl:51: field 'response'"):
        sft(path, tok)


def test_file_level_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        sft(tmp_path / "empty.jsonl", tok)
    (tmp_path / "x.csv").write_text("prompt,response\n")
    with pytest.raises(DataError, match=r"x\.csv: unknown file extension '\.csv'"):
        sft(tmp_path / "x.csv", tok)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        sft(tmp_path / "nope.jsonl", tok)
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(DataError, match=r"rows\.jsonl: is a folder; expected a \.jsonl, \.json or \.parquet file$"):
        sft(tmp_path / "rows.jsonl", tok)


def test_prompt_too_long(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, {"prompt": "word " * 50, "response": "ok"}])
    with pytest.raises(DataError) as e:
        sft(path, tok, max_prompt_len=32)
    msg = str(e.value)
    assert re.match(r".*x\.jsonl:2: field 'prompt': prompt is \d+ tokens, longer than max_prompt_len=32", msg)
    assert "data.max_prompt_len" in msg
    # Prompt datasets check the same limit.
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'prompt': prompt is \d+ tokens"):
        load_prompt_dataset(path, tok, max_prompt_len=32)


def test_sequence_too_long(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "hi", "response": "word " * 100}])
    with pytest.raises(DataError) as e:
        sft(path, tok, max_len=64)
    m = re.search(r"x\.jsonl:1: field 'response': sequence is (\d+) tokens \(prompt (\d+) \+ response (\d+)\)", str(e.value))
    assert m and int(m[1]) == int(m[2]) + int(m[3]) > 64
    assert "max_len=64" in str(e.value) and "data.max_len" in str(e.value)
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "ok", "rejected": "word " * 100}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'rejected': sequence is \d+ tokens"):
        load_preference_dataset(pref, tok, max_prompt_len=BIG, max_len=64)


def test_preference_validation(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'rejected': identical to 'chosen'"):
        load_preference_dataset(path, tok, max_prompt_len=BIG, max_len=BIG)
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi", "chosen": "a"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'rejected': missing"):
        load_preference_dataset(path, tok, max_prompt_len=BIG, max_len=BIG)


def test_prompt_rows_type_checks(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "answer": [1]}])
    with pytest.raises(DataError, match=r"x\.jsonl:1: field 'answer': expected a string or number, got list"):
        load_prompt_dataset(path, tok, max_prompt_len=BIG)
    path = write_jsonl(tmp_path / "y.jsonl", [{"prompt": "a", "meta": "m"}])
    with pytest.raises(DataError, match=r"y\.jsonl:1: field 'meta': expected an object, got str"):
        load_prompt_dataset(path, tok, max_prompt_len=BIG)


# ---------------------------------------------------------------- skip_bad_rows


def test_skip_bad_rows_report(tmp_path, tok):
    rows: list[Any] = [GOOD] * 10
    rows[4] = "{not json"  # line 5
    rows[6] = {"prompt": "word " * 50, "response": "x"}  # line 7
    rows[8] = {"prompt": "word " * 60, "response": "x"}  # line 9
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    examples, report = sft(path, tok, max_prompt_len=32, skip_bad_rows=True)
    assert len(examples) == 7 and [e.source for e in examples][:4] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    assert report.total_rows == 10 and report.skipped == 3 and report.kept == 7
    assert report.counts == {"prompt too long": 2, "bad JSON": 1}
    assert report.places == [f"{path}:5", f"{path}:7", f"{path}:9"]
    assert report.summary() == (
        f"skipped 3 of 10 rows in {path}: 2 prompt too long (max_prompt_len=32; first at line 7), "
        "1 bad JSON (first at line 5)"
    )
    # Without skipping, the first bad row raises.
    with pytest.raises(DataError, match=r"x\.jsonl:5: bad JSON"):
        sft(path, tok, max_prompt_len=32)


def test_skip_bad_rows_all_bad_is_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", ["{", {"prompt": 1}])
    with pytest.raises(DataError, match=r"x\.jsonl: every row is bad: skipped 2 of 2 rows"):
        sft(path, tok, skip_bad_rows=True)



def test_a_line_that_is_not_utf8_is_a_bad_row(tmp_path, tok):
    """The file is decoded line by line: a bad byte names its line, and skip_bad_rows skips
    that line only. A byte-order mark before the first row is allowed."""
    good = json.dumps(GOOD).encode()
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(DataError, match=r"x\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 16\)"):
        sft(path, tok)
    examples, report = sft(path, tok, skip_bad_rows=True)
    assert [e.source for e in examples] == [f"{path}:{i}" for i in (1, 2, 4)]
    assert report.counts == {"not UTF-8": 1}
    # lines end at \n, \r\n or a bare \r; a bad byte on the first line is counted after the BOM
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "caf\xe9"}\r' + good + b"\r\n" + good + b"\r")
    with pytest.raises(DataError, match=r"x\.jsonl:1: not UTF-8 text \(byte 0xe9 at column 16\)"):
        sft(path, tok)
    assert [e.source for e in sft(path, tok, skip_bad_rows=True)[0]] == [f"{path}:2", f"{path}:3"]

def test_clean_file_report(tmp_path, tok):
    _, report = sft(write_jsonl(tmp_path / "x.jsonl", [GOOD]), tok, skip_bad_rows=True)
    assert report.skipped == 0 and report.summary().startswith("skipped 0 of 1 rows")


# ---------------------------------------------------------------- parquet


def test_parquet(tmp_path, tok):
    path = tmp_path / "x.parquet"
    pq.write_table(
        pa.table({"prompt": ["a", "b", "c"], "answer": [1, None, 3], "level": ["easy", "hard", "easy"]}), path
    )
    examples, _ = load_prompt_dataset(path, tok, max_prompt_len=BIG)
    assert [e.answer for e in examples] == ["1", None, "3"]
    assert examples[1].meta == {"level": "hard"} and examples[2].source == f"{path}:row 3"

    pq.write_table(pa.table({"prompt": ["a", None], "response": ["x", "y"]}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s\.parquet:row 2: field 'prompt': missing"):
        sft(tmp_path / "s.parquet", tok)

    msgs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    pq.write_table(pa.table({"messages": msgs}), tmp_path / "m.parquet")
    (ex,), _ = sft(tmp_path / "m.parquet", tok)
    assert trained_text(tok, ex.input_ids, ex.loss_mask) == "hello<|im_end|>"

    # every row has every column: a null is no value, not an unknown field or a conflict
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["x", "y"], "source": [None, None]}),
                   tmp_path / "n.parquet")
    assert len(sft(tmp_path / "n.parquet", tok)[0]) == 2
    pq.write_table(pa.table({"prompt": ["a", "b"], "genre": ["drama", None], "meta": [None, {"genre": "comedy"}]}),
                   tmp_path / "g.parquet")
    examples, _ = load_prompt_dataset(tmp_path / "g.parquet", tok, max_prompt_len=BIG)
    assert [e.meta["genre"] for e in examples] == ["drama", "comedy"]
    # rows in either SFT form, in one file: each row's null columns are the other form's
    pq.write_table(pa.table({"messages": [msgs[0], None], "prompt": [None, "hi"], "response": [None, "hello"]}),
                   tmp_path / "mixed.parquet")
    chat, plain = sft(tmp_path / "mixed.parquet", tok)[0]
    assert trained_text(tok, chat.input_ids, chat.loss_mask) == "hello<|im_end|>"
    assert trained_text(tok, plain.input_ids, plain.loss_mask) == "hello<|im_end|>"
    pq.write_table(pa.table({"messages": [msgs[0]], "prompt": ["hi"]}), tmp_path / "both.parquet")
    with pytest.raises(DataError, match=r"both\.parquet:row 1: field 'messages': give either messages or prompt"):
        sft(tmp_path / "both.parquet", tok)


def test_corrupt_parquet(tmp_path, tok):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read parquet"):
        sft(tmp_path / "bad.parquet", tok)


# ---------------------------------------------------------------- tokenisation and loss masks


def test_chat_template_prompt_response(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "What is the capital?", "response": "Paris."}])
    (ex,), _ = sft(path, tok)
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital?"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids and not any(ex.loss_mask[:n]) and all(ex.loss_mask[n:])
    # up to the eos a sampled response stops at: the template's newline after it is dropped
    assert tok.decode(ex.input_ids[n:]) == "Paris.<|im_end|>"
    assert all(type(t) is int for t in ex.input_ids) and pickle.loads(pickle.dumps(ex)) == ex

    (p,), _ = load_prompt_dataset(path, tok, max_prompt_len=BIG)
    assert p.prompt_ids == prompt_ids and tok.decode(p.prompt_ids).endswith("<|im_start|>assistant\n")


def test_chat_template_messages_two_assistant_turns(tmp_path, tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "trailing turn, no loss"},
    ]
    (ex,), _ = sft(write_jsonl(tmp_path / "x.jsonl", [{"messages": msgs}]), tok)
    # each turn up to its eos: the newline after the first is context, the one after the last dropped
    assert trained_text(tok, ex.input_ids, ex.loss_mask) == "Hello!<|im_end|>Paris.<|im_end|>"
    # The ids are the template's rendering of the conversation up to the last assistant turn's eos.
    full = tok.apply_chat_template(msgs[:5], tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(ex.input_ids)] == ex.input_ids and tok.decode(full[len(ex.input_ids):]) == "\n"
    assert not ex.loss_mask[0]


def test_no_template(tmp_path, plain_tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "What is 2+2?", "response": " 4"}])
    (ex,), _ = sft(path, plain_tok)
    p = plain_tok("What is 2+2?")["input_ids"]
    r = plain_tok(" 4", add_special_tokens=False)["input_ids"] + [plain_tok.eos_token_id]
    assert ex.input_ids == p + r and ex.loss_mask == [False] * len(p) + [True] * len(r)

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    (ex,), _ = sft(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), plain_tok)
    assert trained_text(plain_tok, ex.input_ids, ex.loss_mask) == "b<|endoftext|>d<|endoftext|>"


def test_non_prefix_template_falls_back(tmp_path, tmp_path_factory):
    # A template whose generation prompt is not a prefix of the rendered assistant turn.
    weird = tiny_tokenizer(tmp_path_factory.mktemp("weird"))
    weird.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
    )
    (ex,), _ = sft(write_jsonl(tmp_path / "x.jsonl", [{"prompt": "hi", "response": "yo"}]), weird)
    assert trained_text(weird, ex.input_ids, ex.loss_mask) == "yo<|im_end|>"


def test_preference_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Pick one", "chosen": "good", "rejected": "bad answer"}])
    (ex,), _ = load_preference_dataset(path, tok, max_prompt_len=BIG, max_len=BIG)
    assert isinstance(ex, PreferenceExample)
    n = ex.prompt_len
    assert ex.chosen_ids[:n] == ex.rejected_ids[:n]
    assert tok.decode(ex.chosen_ids[n:]) == "good<|im_end|>" and tok.decode(ex.rejected_ids[n:]) == "bad answer<|im_end|>"


def test_prompt_meta_and_answer(tmp_path, tok):
    rows = [{"prompt": "2+2?", "answer": 4, "meta": {"k": 1}, "id": "q1"}, {"prompt": "hi"}]
    (a, b), _ = load_prompt_dataset(write_jsonl(tmp_path / "x.jsonl", rows), tok, max_prompt_len=BIG)
    assert (a.answer, a.meta, a.prompt) == ("4", {"k": 1, "id": "q1"}, "2+2?")
    assert (b.answer, b.meta, b.source) == (None, {}, f"{tmp_path / 'x.jsonl'}:2")
    # a key both at the top level and in meta, with different values: which one did the user mean?
    rows = [{"prompt": "hi", "genre": "drama", "meta": {"genre": "comedy", "k": 1}}]
    with pytest.raises(DataError, match=r"x2\.jsonl:1: field 'genre': given both at the top level \('drama'\)"):
        load_prompt_dataset(write_jsonl(tmp_path / "x2.jsonl", rows), tok, max_prompt_len=BIG)


def test_sft_and_preference_rows_keep_bookkeeping_under_meta(tmp_path, tok):
    (ex,), _ = sft(write_jsonl(tmp_path / "s.jsonl", [{**GOOD, "meta": {"id": 7}}]), tok)
    assert trained_text(tok, ex.input_ids, ex.loss_mask).startswith("4")
    pair = {"prompt": "Pick one", "chosen": "good", "rejected": "bad"}
    load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", [{**pair, "meta": {"id": 7}}]), tok,
                            max_prompt_len=BIG, max_len=BIG)
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'margin': unknown field \(preference rows have prompt, "):
        load_preference_dataset(write_jsonl(tmp_path / "q.jsonl", [{**pair, "margin": 2}]), tok,
                                max_prompt_len=BIG, max_len=BIG)


# ---------------------------------------------------------------- split_eval


def test_split_eval():
    data = list(range(100))
    train, ev = split_eval(data, 0.1, seed=3)
    assert len(ev) == 10 and sorted(train + ev) == data and train == sorted(train)
    assert split_eval(data, 0.1, seed=3) == (train, ev)
    assert split_eval(data, 0.1, seed=4)[1] != ev
    assert len(split_eval(data[:5], 0.01, seed=0)[1]) == 1  # at least one eval row
    assert split_eval(data[:1], 0.5, seed=0) == ([0], [])
    assert split_eval(data, 0.0, seed=0) == (data, [])
    with pytest.raises(ValueError):
        split_eval(data, 1.0, seed=0)
