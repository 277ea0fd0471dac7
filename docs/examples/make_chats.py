"""Writes chats.jsonl: 300 two-turn date-rewriting conversations (seeded), the data of docs/TRAINING.md.

The second user turn refers back to the first ("that date"), so the last answer needs the whole
conversation; the loss covers both assistant turns, and exact match scores the last one.
"""

import datetime
import json
import random
from pathlib import Path

FOLLOW_UPS = {
    "Now write that date as DD/MM/YYYY.": "%d/%m/%Y",
    "And in the US style, MM/DD/YYYY?": "%m/%d/%Y",
    "Which day of the week was that?": "%A",
}


def chat(rng: random.Random) -> dict:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
    follow_up = rng.choice(list(FOLLOW_UPS))
    return {"messages": [
        {"role": "system", "content": "You rewrite dates."},
        {"role": "user", "content": f"Convert the date {day.isoformat()} to the format 'Month D, YYYY'."},
        {"role": "assistant", "content": f"{day:%B} {day.day}, {day.year}"},
        {"role": "user", "content": follow_up},
        {"role": "assistant", "content": day.strftime(FOLLOW_UPS[follow_up])},
    ]}


if __name__ == "__main__":
    rng = random.Random(0)
    lines = [json.dumps(chat(rng)) for _ in range(300)]
    (Path(__file__).parent / "chats.jsonl").write_text("\n".join(lines) + "\n")
