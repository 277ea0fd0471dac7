"""The demo task: deterministic, disjoint splits, answers right by an independent formatter."""

from __future__ import annotations

import datetime
import re

import pytest

from lorakit.data.demo import make_demo


def test_deterministic_and_disjoint():
    train, held_out = make_demo(seed=3, n_train=500, n_eval=50)
    assert (train, held_out) == make_demo(seed=3, n_train=500, n_eval=50)
    assert make_demo(seed=4, n_train=500, n_eval=50) != (train, held_out)
    assert len(train) == 500 and len(held_out) == 50
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in held_out}


def test_answers_are_long_form_dates():
    train, held_out = make_demo(seed=0, n_train=300, n_eval=30)
    for example in train + held_out:
        user, assistant = example.messages
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        iso = re.search(r"\d{4}-\d{2}-\d{2}", user["content"]).group()
        date = datetime.date.fromisoformat(iso)
        assert assistant["content"] == f"{date.strftime('%B')} {date.day}, {date.year}"


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_train"):
        make_demo(n_train=-1)
