"""Write the quickstart task data (sort numbers, reverse words, add numbers) deterministically.

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


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    HERE.mkdir(parents=True, exist_ok=True)
    train, held_out = make(512, seed=1), make(64, seed=2)
    seen = {r["messages"][0]["content"] for r in train}
    held_out = [r for r in held_out if r["messages"][0]["content"] not in seen]
    write(HERE / "train.jsonl", train)
    write(HERE / "val.jsonl", held_out)
    print(f"wrote {len(train)} training and {len(held_out)} held-out examples to {HERE}")
