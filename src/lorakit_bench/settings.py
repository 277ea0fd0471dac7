"""Parse a bench suite's `--set KEY=VALUE` options against its defaults, one loop for every suite."""

from __future__ import annotations

from collections.abc import Callable

BOOLS = {"1": True, "true": True, "0": False, "false": False}


def convert(raw: str, default: object) -> object:
    """`raw` as the type of `default`: bool 1/0/true/false, int, float, str; list/tuple comma-separated with the
    type of the default's first element (str when empty); None keeps the string. Raises ValueError."""
    if isinstance(default, bool):  # before int: bool is an int
        if raw.lower() not in BOOLS:
            raise ValueError(raw)
        return BOOLS[raw.lower()]
    if isinstance(default, (list, tuple)):
        element = default[0] if default else ""
        values = [convert(x, element) for x in raw.split(",") if x]
        return type(default)(values)
    if isinstance(default, (int, float)):
        return type(default)(raw)
    return raw


def parse_settings(suite: str, items: list[str] | None, defaults: dict, quick: dict | None = None,
                   parsers: dict[str, Callable[[str], object]] | None = None) -> dict:
    """`defaults`, then `quick`'s values, then each "KEY=VALUE" of `items`, converted by the default's type
    (or by `parsers[KEY]`). Unknown keys, a missing '=' and unconvertible values raise ValueError."""
    found = {**defaults, **(quick or {})}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"bench {suite}: --set {item!r}: expected KEY=VALUE, KEY one of {', '.join(defaults)}")
        try:
            parse = (parsers or {}).get(key)
            found[key] = parse(raw) if parse else convert(raw, defaults[key])
        except ValueError:
            raise ValueError(f"bench {suite}: --set {item!r}: {raw!r} is not a valid {key}") from None
    return found
