"""Write the quickstart task data (sort numbers, reverse words, add numbers) deterministically, and preference pairs
for the same tasks (chosen: the bare correct answer; rejected: a wrong one, or the right one wrapped in an
explanation).

The embedded SmolLM2-135M-Instruct answers these with explanations instead of the bare answer, so exact match
starts near 0% and a few minutes of LoRA on the CPU lifts it measurably. Run: python data/make_quickstart_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger lamp garden music pencil window orange forest candle rocket silver "
         "bridge winter coffee planet mirror").split()
HERE = Path(__file__).resolve().parent / "quickstart"


def sort_task(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 7))
    return (f"Sort these numbers in ascending order: {', '.join(map(str, numbers))}",
            ", ".join(map(str, sorted(numbers))))


def reverse_task(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 7))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def add_task(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add {a} and {b}.", str(a + b)


def make(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    tasks = (sort_task, reverse_task, add_task)
    records = []
    for _ in range(count):
        question, answer = rng.choice(tasks)(rng)
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def wrong_answer(question: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: a sum off by a little, a list with two items swapped."""
    if question.startswith("Add"):
        return str(int(answer) + rng.choice((-10, -2, -1, 1, 2, 10)))
    separator = ", " if question.startswith("Sort") else " "
    items = answer.split(separator)
    i, j = rng.sample(range(len(items)), 2)
    items[i], items[j] = items[j], items[i]
    return separator.join(items)


def preference_pairs(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for record in records:
        question, answer = (m["content"] for m in record["messages"])
        rejected = (wrong_answer(question, answer, rng) if rng.random() < 0.5
                    else f"Sure! Let me work through this step by step. The answer is {answer}.")
        pairs.append({"prompt": question, "chosen": answer, "rejected": rejected})
    return pairs


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    HERE.mkdir(parents=True, exist_ok=True)
    train, held_out = make(512, seed=1), make(64, seed=2)
    seen = {r["messages"][0]["content"] for r in train}
    held_out = [r for r in held_out if r["messages"][0]["content"] not in seen]
    write(HERE / "train.jsonl", train)
    write(HERE / "val.jsonl", held_out)
    write(HERE / "preference_train.jsonl", preference_pairs(train, seed=3))
    write(HERE / "preference_val.jsonl", preference_pairs(held_out, seed=4))
    print(f"wrote {len(train)} training and {len(held_out)} held-out examples (and as many preference pairs) to "
          f"{HERE}")
