"""The built-in task suite: seeded and disjoint splits, answers right by independent references written here,
exact-match scoring, size limits, and `dataset: task:NAME` through the config into a (tiny) training run."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from lorakit.config import load_train_config
from lorakit.data.demo import make_demo
from lorakit.data.tasks import NAMES, TASKS, make_task
from lorakit.generate import exact_match

NEW_TASKS = ("json", "units", "roman")


def prompt(row) -> str:
    """Everything the model is given: all messages but the answer."""
    return json.dumps(row.messages[:-1])


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_seeded_distinct_and_disjoint(name):
    train, held_out = make_task(name, seed=5, n_train=400, n_eval=100)
    assert (train, held_out) == make_task(name, seed=5, n_train=400, n_eval=100)
    assert make_task(name, seed=6, n_train=400, n_eval=100) != (train, held_out)
    assert (len(train), len(held_out)) == (400, 100)
    prompts = [prompt(r) for r in train + held_out]
    assert len(set(prompts)) == 500  # distinct rows, so none of held-out is in train
    assert not {prompt(r) for r in train} & {prompt(r) for r in held_out}
    for row in train + held_out:
        roles = [m["role"] for m in row.messages]
        assert roles[-1] == "assistant" and roles == ["user", "assistant"] * (len(roles) // 2)


def test_held_out_stays_out_of_training_when_the_space_is_nearly_used_up():
    train, held_out = make_task("roman", seed=0, n_train=3899, n_eval=100)
    numbers = [int(re.search(r"\d+", r.messages[0]["content"]).group()) for r in train + held_out]
    assert sorted(numbers) == list(range(1, 4000))  # every number once: train and held-out split them


def test_demo_is_the_demo():
    assert make_task("demo", seed=2, n_train=30, n_eval=5) == make_demo(2, n_train=30, n_eval=5)
    assert load_train_config(None, ["dataset=task:demo"]).max_new_tokens == load_train_config().max_new_tokens


ROMAN_DIGITS = (("", "M", "MM", "MMM"),
                ("", "C", "CC", "CCC", "CD", "D", "DC", "DCC", "DCCC", "CM"),
                ("", "X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC"),
                ("", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"))


def roman_reference(n: int) -> str:
    """Table lookup digit by digit (thousands, hundreds, tens, ones)."""
    digits = f"{n:04d}"
    return "".join(table[int(d)] for table, d in zip(ROMAN_DIGITS, digits, strict=True))


def test_roman_answers():
    assert roman_reference(1994) == "MCMXCIV" and roman_reference(3999) == "MMMCMXCIX"  # the reference itself
    train, held_out = make_task("roman", seed=0, n_train=3000, n_eval=999)
    for row in train + held_out:
        (n,) = re.fullmatch(r"Write (\d+) in Roman numerals\.", row.messages[0]["content"]).groups()
        assert row.messages[1]["content"] == roman_reference(int(n))


ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WORD_VALUES = {w: i for i, w in enumerate(ONES)} | {w: 10 * i for i, w in enumerate(TENS, start=2)}


def words_to_number(words: list[str]) -> int:
    """"three hundred forty-five" as its words -> 345, by accumulating (an independent reading)."""
    total = 0
    for word in words:
        if word == "hundred":
            total *= 100
        else:
            total += sum(WORD_VALUES[part] for part in word.split("-"))
    return total


def test_json_answers():
    assert words_to_number(["nine", "hundred", "ninety-nine"]) == 999
    assert words_to_number(["three", "hundred", "five"]) == 305
    train, held_out = make_task("json", seed=1, n_train=1500, n_eval=200)
    forms, prices = set(), set()
    for row in train + held_out:
        question, answer = row.messages[0]["content"], row.messages[1]["content"]
        sentence = question.removeprefix("Extract name, item and price as JSON: ")
        assert sentence != question
        fields = json.loads(answer)
        assert list(fields) == ["name", "item", "price"] and isinstance(fields["price"], int)
        assert answer == json.dumps(fields, separators=(",", ":"))  # compact: no spaces anywhere
        words = re.findall(r"[A-Za-z]+", sentence)
        assert [w for w in words if w in NAMES] == [fields["name"]]
        assert fields["item"] in words and fields["item"] not in NAMES
        spelled = re.findall(r"[a-z-]+", sentence)
        number = [w for w in spelled if w == "hundred" or w.split("-")[0] in WORD_VALUES]
        assert words_to_number(number) == fields["price"], sentence
        assert not re.search(r"\d", sentence)  # the price is only in words
        forms.add(sentence.replace(" ".join(number), "P").replace(fields["name"], "N").replace(fields["item"], "I"))
        prices.add(fields["price"])
    assert len(forms) >= 6  # the facts come in several sentence forms
    # prices of every shape: one word, no tens ("three hundred five"), round tens ("three hundred forty")
    assert min(prices) < 20 and any(p > 100 and p % 100 < 10 for p in prices)
    assert any(p > 100 and p % 10 == 0 and p % 100 for p in prices)


METRES_OR_GRAMS = {"km": Fraction(1000), "m": Fraction(1), "cm": Fraction(1, 100), "mm": Fraction(1, 1000),
                   "kg": Fraction(1000), "g": Fraction(1), "mg": Fraction(1, 1000)}


def decimal_reference(x: Fraction) -> str:
    """An exact decimal fraction as digits with the point where it belongs, no trailing zeros."""
    places = 0
    while x.denominator != 1:
        x, places = x * 10, places + 1
    digits = str(x.numerator).rjust(places + 1, "0")
    return digits if not places else f"{digits[:-places]}.{digits[-places:]}"


def test_units_answers():
    assert decimal_reference(Fraction(113, 100_000_000)) == "0.00000113"
    assert decimal_reference(Fraction(325000)) == "325000"
    train, held_out = make_task("units", seed=2, n_train=2000, n_eval=200)
    for row in train + held_out:
        first, reply, follow_up, answer = (m["content"] for m in row.messages)
        value, source, target = re.fullmatch(r"Convert ([\d.]+) (\w+) to (\w+)\.", first).groups()
        (then,) = re.fullmatch(r"And in (\w+)\?", follow_up).groups()
        assert len({source, target, then}) == 3
        converted = Fraction(value) * METRES_OR_GRAMS[source] / METRES_OR_GRAMS[target]
        assert reply == f"{decimal_reference(converted)} {target}"
        again = converted * METRES_OR_GRAMS[target] / METRES_OR_GRAMS[then]
        assert answer == f"{decimal_reference(again)} {then}"
        assert ({source, target, then} <= {"km", "m", "cm", "mm"}) or ({source, target, then} <= {"kg", "g", "mg"})


@pytest.mark.parametrize("name", NEW_TASKS)
def test_exact_match_takes_the_answer_and_nothing_near_it(name):
    (row,) = make_task(name, seed=0, n_train=0, n_eval=1)[1]
    answer = row.messages[-1]["content"]
    assert exact_match([answer], [answer]) == 1.0
    assert exact_match([f" {answer}\n"], [answer]) == 1.0  # surrounding whitespace is not the answer
    one_off = answer[:-1] + ("X" if answer[-1] != "X" else "I")
    assert exact_match([one_off], [answer]) == 0.0
    assert exact_match([answer + " is the answer"], [answer]) == 0.0
    assert exact_match([answer[:-1]], [answer]) == 0.0


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="unknown built-in task 'rome'; known tasks: demo, json, units, roman"):
        make_task("rome")
    with pytest.raises(ValueError, match=r"'roman' has 3999 distinct examples; n_train \+ n_eval .* = 4000"):
        make_task("roman", n_train=3901, n_eval=99)
    assert len(make_task("roman", n_train=3900, n_eval=99)[0]) == 3900
    with pytest.raises(ValueError, match="n_eval must be a non-negative integer"):
        make_task("json", n_eval=-1)
    for task in TASKS.values():
        assert task.max_new_tokens >= 8 and task.size >= 1100  # the default 1000 + 100 rows fit every task


def test_config_selects_a_task_and_names_the_field():
    cfg = load_train_config(None, ["dataset=task:roman"])
    assert (cfg.output_dir, cfg.max_new_tokens) == ("runs/task-roman", TASKS["roman"].max_new_tokens)
    assert load_train_config(None, ["dataset=task:json"]).max_new_tokens == TASKS["json"].max_new_tokens
    assert load_train_config(None, ["dataset=task:json", "max_new_tokens=40"]).max_new_tokens == 40
    assert load_train_config().output_dir == "runs/demo"
    with pytest.raises(ValueError, match="dataset: unknown built-in task 'rome'; known tasks: demo, json"):
        load_train_config(None, ["dataset=task:rome"])
    with pytest.raises(ValueError, match=r"demo_train \+ demo_eval = 3950 \+ 100 exceeds the 3999 .*task:roman"):
        load_train_config(None, ["dataset=task:roman", "demo_train=3950"])


def test_training_on_a_task_uses_its_rows(tiny_model_dir, tmp_path, monkeypatch):
    """`dataset: task:roman` end to end on a tiny model: the run trains on the task's training rows and
    scores its held-out rows, sized by demo_train / demo_eval, with the task's generation length."""
    import lorakit.data.encode
    import lorakit.generate
    import lorakit.train.run as train_run

    seen = {"encoded": [], "scored": []}

    def encode_all(tokenizer, rows, *args, **kwargs):
        seen["encoded"].append(rows)
        return lorakit.data.encode.encode_all(tokenizer, rows, *args, **kwargs)

    def score_rows(model, tokenizer, rows, max_new_tokens):
        seen["scored"].append((rows, max_new_tokens))
        return lorakit.generate.score_rows(model, tokenizer, rows, max_new_tokens)

    monkeypatch.setattr(train_run, "encode_all", encode_all)
    monkeypatch.setattr(train_run, "score_rows", score_rows)
    cfg = load_train_config(None, [f"base={tiny_model_dir}", "dataset=task:roman", "demo_train=12", "demo_eval=3",
                                   "seed=4", "max_steps=2", "batch_size=4", "warmup_steps=1",
                                   f"output_dir={tmp_path / 'run'}"])
    _, results = train_run.run(cfg, log=lambda *_: None)
    train, held_out = make_task("roman", seed=4, n_train=12, n_eval=3)
    assert seen["encoded"] == [train]  # trained on (no validation loss asked for)
    n = TASKS["roman"].max_new_tokens
    assert seen["scored"] == [(held_out, n), (held_out, n)]  # before and after training
    assert (results["train_examples"], results["eval_examples"], results["steps"]) == (12, 3, 2)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert saved["dataset"] == "task:roman" and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_eval_scores_a_task_runs_held_out_rows(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`lorakit eval ADAPTER` of a task run scores that run's held-out rows (from its results.json) with the
    task's generation length, as the commands printed after training say."""
    import lorakit.generate
    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", f"base={tiny_model_dir}", "dataset=task:units", "demo_train=8", "demo_eval=2", "seed=3",
                 "max_steps=1", "batch_size=4", "warmup_steps=1", "eval=false", f"output_dir={out}"]) == 0
    scored = []
    score_rows = lorakit.generate.score_rows
    monkeypatch.setattr(lorakit.generate, "score_rows", lambda model, tok, rows, n: scored.append((rows, n)) or
                        score_rows(model, tok, rows, n))
    printed = capsys.readouterr().out  # the next steps: eval finds the held-out rows, generate tries a question
    assert f"eval {out / 'adapter'}\n" in printed and "generate" in printed and "'Convert " in printed
    assert main(["eval", str(out / "adapter")]) == 0
    assert scored == [(make_task("units", seed=3, n_train=8, n_eval=2)[1], TASKS["units"].max_new_tokens)]
    assert "(2 examples: the held-out rows of the run in" in capsys.readouterr().out


@pytest.mark.slow
def test_answers_fit_max_new_tokens_and_rows_stay_short_on_the_default_model():
    """In the default model's tokens: every answer and its end of turn fit the task's `max_new_tokens`, and a
    whole row (chat template and default system prompt included) stays under 80 tokens, so the many runs of
    a learning benchmark stay cheap."""
    from transformers import AutoTokenizer

    from lorakit.data.encode import encode_row
    from lorakit.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("default"))
    for name, task in TASKS.items():
        train, held_out = make_task(name, seed=0, n_train=1500, n_eval=500)
        for row in train + held_out:
            answer = tokenizer(row.messages[-1]["content"], add_special_tokens=False)["input_ids"]
            assert len(answer) + 1 <= task.max_new_tokens, (name, row.messages[-1])
            assert len(encode_row(tokenizer, row)[0]) < 80, (name, row.messages)
