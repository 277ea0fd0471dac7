"""parse_settings: the one `--set KEY=VALUE` parser every bench suite uses."""

import pytest

from lorakit_bench.settings import parse_settings

DEFAULTS = {"n": 8, "ratio": 0.25, "name": "default", "on": False, "sizes": [1, 8], "names": ("a", "b"),
            "layers": None}


def test_defaults_then_quick_then_items():
    assert parse_settings("t", [], DEFAULTS) == DEFAULTS
    assert parse_settings("t", None, DEFAULTS, {"n": 2})["n"] == 2
    assert parse_settings("t", ["n=5"], DEFAULTS, {"n": 2})["n"] == 5
    assert DEFAULTS["n"] == 8  # the defaults are not mutated


def test_types_follow_the_default():
    found = parse_settings("t", ["n=3", "ratio=0.5", "name=x=y", "on=true", "sizes=2,,16", "names=q,k,v",
                                 "layers=4"], DEFAULTS)
    assert found == {"n": 3, "ratio": 0.5, "name": "x=y", "on": True, "sizes": [2, 16], "names": ("q", "k", "v"),
                     "layers": "4"}
    assert type(found["n"]) is int and type(found["ratio"]) is float
    assert [parse_settings("t", [f"on={raw}"], DEFAULTS)["on"] for raw in ("1", "0", "False", "TRUE")] == \
        [True, False, False, True]


def test_parsers_override():
    found = parse_settings("t", ["layers=4", "name=ab"], DEFAULTS, parsers={"layers": int, "name": str.upper})
    assert found["layers"] == 4 and found["name"] == "AB"


@pytest.mark.parametrize("item", ["m=3", "n3", "=3"])
def test_unknown_key_or_missing_equals(item):
    with pytest.raises(ValueError, match=f"bench t: --set '{item}': expected KEY=VALUE, KEY one of n, ratio, name"):
        parse_settings("t", [item], DEFAULTS)


@pytest.mark.parametrize("item, raw, key", [("n=3.5", "3.5", "n"), ("ratio=big", "big", "ratio"),
                                            ("on=yes", "yes", "on"), ("sizes=1,x", "1,x", "sizes"),
                                            ("layers=x", "x", "layers")])
def test_bad_value(item, raw, key):
    with pytest.raises(ValueError, match=f"bench t: --set '{item}': '{raw}' is not a valid {key}$"):
        parse_settings("t", [item], DEFAULTS, parsers={"layers": int})
