"""The built-in task suite: small chat tasks of graded difficulty, generated from a seed, scored by exact match.

Each task turns (seed, n_train, n_eval) into (train, held-out) rows in the `messages` format a user would
write. Every example is one point of a finite, enumerated space of keys (a number, a tuple of choices); the
rows of one call are distinct keys drawn without replacement, so no held-out prompt appears in training.
A held-out row is scored like the demo's: the model's greedy answer to all messages but the last must equal
the last (assistant) message after stripping surrounding whitespace (`lorakit.generate.exact_match`).

    demo    ISO date -> "Month D, YYYY"                      easy: a lookup and a reorder
    json    a sentence about a person -> compact JSON        medium: find three facts, age in words -> digits
    units   metric conversion, then a follow-up ("And in     medium-hard, two turns: move the decimal point;
            cm?") that converts the first answer again        the follow-up needs the first answer
    roman   1..3999 -> Roman numerals ("MMCDXLIV")            hard: one pattern per decimal digit and place

SmolLM2-135M-Instruct (the default base) scores under 20% on each before training (docs/RESULTS.md,
"Built-in tasks"). Rows are short (under about 80 tokens with SmolLM2's chat template and its default
system prompt) so that many training runs fit on a CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from lorakit.data.demo import N_DAYS, make_demo
from lorakit.data.formats import Row


@dataclass(frozen=True)
class Task:
    """A built-in task: `make(seed, n_train, n_eval)` -> (train, held-out) rows of distinct examples.

    `max_new_tokens` covers the longest answer (in SmolLM2's tokens, plus end of turn and a margin);
    `size` is the number of distinct examples, the most `n_train + n_eval` can be.
    """

    name: str
    description: str
    make: Callable[[int, int, int], tuple[list[Row], list[Row]]]
    max_new_tokens: int
    size: int


def chat(name: str, key: str, *turns: str) -> Row:
    """A row alternating user and assistant turns (user first, assistant last); `source` names the example."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return Row(messages, None, f"task:{name}:{key}")


def split(keys: list, example: Callable[[object], Row], n_train: int) -> tuple[list[Row], list[Row]]:
    rows = [example(k) for k in keys]
    return rows[:n_train], rows[n_train:]


def draw(seed: int, size: int, n_train: int, n_eval: int, name: str) -> list[int]:
    """`n_train + n_eval` distinct indices of a space of `size` examples, in the seed's order."""
    check_sizes(name, size, n_train, n_eval)
    return random.Random(seed).sample(range(size), n_train + n_eval)


def check_sizes(name: str, size: int, n_train: int, n_eval: int) -> None:
    for key, value in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"task {name!r}: {key} must be a non-negative integer, got {value!r}")
    if n_train + n_eval > size:
        raise ValueError(f"task {name!r} has {size} distinct examples; n_train + n_eval = {n_train} + {n_eval} "
                         f"= {n_train + n_eval} exceeds it")


# --- roman: an integer -> Roman numerals ---------------------------------------------------------------

ROMAN_MAX = 3999
ROMAN_VALUES = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
                (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


def to_roman(n: int) -> str:
    """Standard (subtractive) Roman numerals of 1..3999: 1994 -> "MCMXCIV"."""
    if not 1 <= n <= ROMAN_MAX:
        raise ValueError(f"Roman numerals cover 1..{ROMAN_MAX}, got {n}")
    out = []
    for value, letters in ROMAN_VALUES:
        count, n = divmod(n, value)
        out.append(letters * count)
    return "".join(out)


def roman_example(n: int) -> Row:
    return chat("roman", str(n), f"Write {n} in Roman numerals.", to_roman(n))


def make_roman(seed: int = 0, n_train: int = 1000, n_eval: int = 100) -> tuple[list[Row], list[Row]]:
    """Distinct integers of 1..3999: "Write 2444 in Roman numerals." -> "MMCDXLIV"."""
    keys = [i + 1 for i in draw(seed, ROMAN_MAX, n_train, n_eval, "roman")]
    return split(keys, roman_example, n_train)


# --- json: facts in a sentence -> compact JSON ---------------------------------------------------------

NAMES = ("Ana", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kim", "Leo",
         "Maria", "Nadia", "Omar", "Paula", "Quentin", "Rosa", "Sam", "Tara", "Umar", "Vera", "Walter", "Yuki",
         "Zoe", "Amir", "Bruno", "Chloe", "Dmitri", "Emma", "Felix", "Greta", "Hana", "Ivan", "Julia", "Karl")
CITIES = ("Lisbon", "Oslo", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Athens",
          "Warsaw", "Helsinki", "Zurich", "Munich", "Milan", "Porto", "Lyon", "Seville", "Krakow", "Boston",
          "Denver", "Austin", "Seattle", "Toronto", "Chicago", "Sydney", "Tokyo", "Seoul", "Lima", "Cairo")
AGES = range(18, 90)
SENTENCES = (
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Living in {city}, {name} is {age} years old.",
    "{city} is home to {name}, who is {age}.",
    "At {age}, {name} moved to {city}.",
    "{name} ({age}) works in {city}.",
    "In {city} we met {name}, {age} years old.",
    "The {age}-year-old {name} lives in {city}.",
)
ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """English words for 1..99: 34 -> "thirty-four"."""
    if not 1 <= n <= 99:
        raise ValueError(f"number words cover 1..99, got {n}")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


JSON_SPACE = (len(NAMES), len(AGES), len(CITIES), len(SENTENCES))


def unravel(index: int, radices: tuple[int, ...]) -> tuple[int, ...]:
    """The mixed-radix digits of `index` (most significant first): one choice per radix."""
    digits = []
    for radix in reversed(radices):
        index, digit = divmod(index, radix)
        digits.append(digit)
    return tuple(reversed(digits))


def json_example(index: int) -> Row:
    n, a, c, s = unravel(index, JSON_SPACE)
    name, age, city = NAMES[n], AGES[a], CITIES[c]
    sentence = SENTENCES[s].format(name=name, age=number_words(age), city=city)
    answer = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"))
    return chat("json", str(index), f"Extract name, age and city as JSON: {sentence}", answer)


def make_json(seed: int = 0, n_train: int = 1000, n_eval: int = 100) -> tuple[list[Row], list[Row]]:
    """Distinct (name, age, city, sentence form): "... Oslo is home to Ben, who is forty-one." ->
    '{"name":"Ben","age":41,"city":"Oslo"}' (keys in that order, no spaces, age a number)."""
    size = len(NAMES) * len(AGES) * len(CITIES) * len(SENTENCES)
    return split(draw(seed, size, n_train, n_eval, "json"), json_example, n_train)


# --- units: a metric conversion, then a follow-up that converts the answer again ------------------------

UNITS = {"km": ("length", 3), "m": ("length", 0), "cm": ("length", -2), "mm": ("length", -3),
         "kg": ("mass", 3), "g": ("mass", 0), "mg": ("mass", -3)}  # unit -> (dimension, power of ten)
# (from, to, then): three different units of one dimension
UNIT_CHAINS = tuple((a, b, c) for a in UNITS for b in UNITS for c in UNITS
                    if len({a, b, c}) == 3 and UNITS[a][0] == UNITS[b][0] == UNITS[c][0])
UNIT_VALUES = tuple(sorted({Decimal(k).scaleb(-d).normalize() for k in range(1, 1000) for d in range(3)}))


def decimal_text(value: Decimal) -> str:
    """A quantity as people write it: no exponent, no trailing zeros ("3250", "0.325", "4.5")."""
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def convert(value: Decimal, source: str, target: str) -> Decimal:
    return value.scaleb(UNITS[source][1] - UNITS[target][1])


def units_example(index: int) -> Row:
    chain, v = unravel(index, (len(UNIT_CHAINS), len(UNIT_VALUES)))
    a, b, c = UNIT_CHAINS[chain]
    value = UNIT_VALUES[v]
    first = convert(value, a, b)
    return chat("units", str(index), f"Convert {decimal_text(value)} {a} to {b}.", f"{decimal_text(first)} {b}",
                f"And in {c}?", f"{decimal_text(convert(first, b, c))} {c}")


def make_units(seed: int = 0, n_train: int = 1000, n_eval: int = 100) -> tuple[list[Row], list[Row]]:
    """Two turns: "Convert 3.25 km to m." -> "3250 m", "And in cm?" -> "325000 cm". The score is the
    follow-up's answer, given the first answer: it converts a quantity the question does not restate."""
    size = len(UNIT_CHAINS) * len(UNIT_VALUES)
    return split(draw(seed, size, n_train, n_eval, "units"), units_example, n_train)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("demo", "rewrite an ISO date in long form: 2019-07-04 -> July 4, 2019 (easy)", make_demo, 12, N_DAYS),
    Task("json", "extract name, age (in words) and city from a sentence as compact JSON (medium)", make_json, 24,
         len(NAMES) * len(AGES) * len(CITIES) * len(SENTENCES)),
    Task("units", "metric conversion, then a follow-up converting the first answer (two turns, medium-hard)",
         make_units, 16, len(UNIT_CHAINS) * len(UNIT_VALUES)),
    Task("roman", "write 1..3999 in Roman numerals: 2444 -> MMCDXLIV (hard)", make_roman, 12, ROMAN_MAX),
)}
TASK_PREFIX = "task:"  # `dataset: task:NAME` selects a task; `dataset: demo` is task:demo


def task_name(dataset) -> str | None:
    """The built-in task a `dataset` value names ("demo" or "task:NAME"), else None (files, `stdlib`)."""
    if not isinstance(dataset, str):
        return None
    if dataset == "demo":
        return "demo"
    return dataset[len(TASK_PREFIX):] if dataset.startswith(TASK_PREFIX) else None


def get_task(name: str) -> Task:
    """The task called `name`, or a ValueError naming the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def make_task(name: str, seed: int = 0, n_train: int = 1000, n_eval: int = 100) -> tuple[list[Row], list[Row]]:
    """(train, held-out) rows of the task `name`; the same seed always gives the same rows."""
    task = get_task(name)
    check_sizes(name, task.size, n_train, n_eval)
    return task.make(seed, n_train, n_eval)
