"""The built-in demo task: rewrite an ISO date in long form ("2019-07-04" -> "July 4, 2019").

Why this task: it is deterministic and scorable by exact match, SmolLM2-135M-Instruct fails it out of
the box (0% held-out exact match: it echoes the ISO date back), and a LoRA adapter learns it (month
number -> name, drop the day's leading zero, move the year) in a few dozen steps on a laptop CPU.
Every prompt has the same token length, so batches need no padding beyond the completion.
"""

from __future__ import annotations

import datetime
import random

from lorakit.data.formats import Row

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_FIRST = datetime.date(1950, 1, 1)
N_DAYS = (datetime.date(2050, 1, 1) - _FIRST).days  # dates are drawn from 1950-01-01 .. 2049-12-31

def date_example(date: datetime.date) -> Row:
    """The prompt asking to rewrite `date` in long form, and its exact answer, as a chat row."""
    prompt = f"Convert the date {date.isoformat()} to the format 'Month D, YYYY'."
    answer = f"{MONTHS[date.month - 1]} {date.day}, {date.year}"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Row(messages, None, f"demo:{date.isoformat()}")


def make_demo(seed: int = 0, n_train: int = 1000, n_eval: int = 100) -> tuple[list[Row], list[Row]]:
    """(train, held-out) splits of distinct dates; the same seed always gives the same splits.

    The dates are drawn without replacement, so no held-out date appears in train.
    """
    if n_train < 0 or n_eval < 0 or n_train + n_eval > N_DAYS:
        raise ValueError(f"need 0 <= n_train, n_eval and n_train + n_eval <= {N_DAYS}, got {n_train}, {n_eval}")
    rng = random.Random(seed)
    days = rng.sample(range(N_DAYS), n_train + n_eval)
    examples = [date_example(_FIRST + datetime.timedelta(days=d)) for d in days]
    return examples[:n_train], examples[n_train:]
