"""Dataset formats, files and loss masks, shown token by token on a character-level tokenizer."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_tokenizer
from lorakit.data.encode import IGNORE, encode_all, encode_row, prompt_text
from lorakit.data.files import read_rows
from lorakit.data.formats import Row, to_row

EOS = 1  # <|im_end|>, also the pad token


def shown(tok, ids, labels) -> str:
    """The row as text with the supervised characters in [brackets]: the mask made visible."""
    out, inside = "", False
    for i, label in zip(ids, labels, strict=True):
        if (label != IGNORE) != inside:
            out += "]" if inside else "["
            inside = not inside
        out += tok.decode([i])
    return out + ("]" if inside else "")


def test_prompt_completion_mask_token_by_token():
    tok = tiny_tokenizer()
    ids, labels = encode_row(tok, to_row({"prompt": "hi", "completion": "yo"}, "t:1"))
    assert shown(tok, ids, labels) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n[yo<|im_end|>]\n"
    # the prompt is exactly what generation feeds the model, then the answer tokens follow
    assert ids[: len(ids) - 4] == tok(prompt_text(tok, "hi"), add_special_tokens=False)["input_ids"]
    assert labels[-4:-1] == [ord("y"), ord("o"), EOS]  # EOS supervised although pad == eos


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"instruction": "add", "input": "1 2", "output": "3", "system": "be brief"},
         "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nadd\n\n1 2<|im_end|>\n"
         "<|im_start|>assistant\n[3<|im_end|>]\n"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                            {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
         "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n[b<|im_end|>]\n"
         "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n[d<|im_end|>]\n"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "r"}, {"role": "user", "content": "again"}]},
         "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n[r<|im_end|>]\n"
         "<|im_start|>user\nagain<|im_end|>\n"),
        ({"text": "plain"}, "[plain<|im_end|>]"),
    ],
    ids=["alpaca", "sharegpt-two-turns", "messages-system-trailing-user", "text"],
)
def test_each_format_mask_token_by_token(raw, expected):
    tok = tiny_tokenizer()
    ids, labels = encode_row(tok, to_row(raw, "t:1"))
    assert shown(tok, ids, labels) == expected


def test_train_on_prompt_supervises_everything():
    tok = tiny_tokenizer()
    ids, labels = encode_row(tok, to_row({"prompt": "hi", "completion": "yo"}, "t:1"), train_on_prompt=True)
    assert labels == ids


def test_no_template_uses_bare_prompt_and_appends_eos():
    tok = tiny_tokenizer()
    tok.chat_template = None
    ids, labels = encode_row(tok, to_row({"prompt": "hi", "completion": "yo"}, "t:1"))
    assert shown(tok, ids, labels) == "hi[yo<|im_end|>]"
    with pytest.raises(ValueError, match=r"t:2: the tokenizer has no chat template"):
        encode_row(tok, to_row({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "r"}]}, "t:2"))


def test_truncate_or_drop_long_rows_with_a_count():
    tok = tiny_tokenizer()
    rows = [to_row({"prompt": "hi", "completion": "x" * n}, f"f:{n}") for n in (1, 30)]
    warnings = []
    kept = encode_all(tok, rows, max_length=40, warn=warnings.append)
    assert [len(ids) for ids, _ in kept] == [len(encode_row(tok, rows[0])[0]), 40]
    assert warnings == ["1 rows longer than max_length=40 truncated (first: f:30)"]
    warnings.clear()
    assert len(encode_all(tok, rows, max_length=40, truncation="drop", warn=warnings.append)) == 1
    assert warnings == ["1 rows longer than max_length=40 dropped (first: f:30)"]
    with pytest.raises(ValueError, match="no row has any token to learn from"):
        encode_all(tok, rows, max_length=10, warn=warnings.append)


def test_row_errors_name_source():
    with pytest.raises(ValueError, match=r"d\.jsonl:3: the conversation has no assistant turn"):
        to_row({"messages": [{"role": "user", "content": "q"}]}, "d.jsonl:3")
    with pytest.raises(ValueError, match=r"d\.jsonl:4: cannot tell the format from the fields \['foo'\]"):
        to_row({"foo": 1}, "d.jsonl:4")
    with pytest.raises(ValueError, match=r"x:1: messages\[1\] needs 'role'"):
        to_row({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "r"}]}, "x:1")
    with pytest.raises(ValueError, match=r"x:1: field 'output' is missing"):
        to_row({"instruction": "i"}, "x:1")
    with pytest.raises(ValueError, match=r"x:1: field 'completion' is not a string \(int\)"):
        to_row({"prompt": "a", "completion": 3}, "x:1")


def test_files_of_every_type_and_errors_name_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"prompt": "p1", "completion": "c1"}\n\n{"text": "t2"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "i3", "output": "o3"}]))
    (tmp_path / "c.csv").write_text("prompt,completion\np4,c4\np5,c5\n")
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "u6"},
                                                       {"role": "assistant", "content": "a6"}]}]),
                   tmp_path / "d.parquet")
    rows = read_rows(str(tmp_path))  # a folder: every dataset file in it, sorted
    assert [r.source.rsplit("/", 1)[1] for r in rows] == ["a.jsonl:1", "a.jsonl:3", "b.json:row 0", "c.csv:2",
                                                         "c.csv:3", "d.parquet:row 0"]
    assert rows[1] == Row(None, "t2", rows[1].source)
    assert rows[5].messages[1] == {"role": "assistant", "content": "a6"}

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON at column"):
        read_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.csv").write_text("prompt,completion\na,b\nc\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: 1 field, but the header has 2"):
        read_rows(str(tmp_path / "bad.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the dataset is empty"):
        read_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match=r"unsupported dataset file type '\.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        read_rows(str(tmp_path / "x.txt"))


def test_mixing_weights(tmp_path):
    for name, n in (("a", 10), ("b", 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n)))
    rows = read_rows([{"path": str(tmp_path / "a.jsonl"), "weight": 0.5}, {"path": str(tmp_path / "b.jsonl"),
                                                                            "weight": 2}], seed=3)
    texts = [r.text for r in rows]
    assert sum(t.startswith("a") for t in texts) == 5 and len(set(t for t in texts if t.startswith("a"))) == 5
    assert sorted(t for t in texts if t.startswith("b")) == sorted([f"b{i}" for i in range(4)] * 2)
    assert rows == read_rows([{"path": str(tmp_path / "a.jsonl"), "weight": 0.5},
                              {"path": str(tmp_path / "b.jsonl"), "weight": 2}], seed=3)
    with pytest.raises(ValueError, match="needs a 'path' and a positive 'weight'"):
        read_rows([{"path": str(tmp_path / "a.jsonl"), "weight": 0}])
