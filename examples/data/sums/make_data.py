"""Write the sums task's files in this folder (deterministic), for examples/online-tiny-run.yaml.

    python examples/data/sums/make_data.py          # rewrites examples/data/sums/*.jsonl
    python examples/data/sums/make_data.py OUT_DIR  # writes them elsewhere (the drift test compares)

"What is a + b?" with a, b in 1..5. The SFT replies give the sum in the answer format half the
time ("The answer is 7.") and are evasive otherwise ("I am not sure."), so a tiny SFT model answers
in the format about half the time and is right far less often: room for an online round to improve
on. Prompts carry the reference `answer` the label stage's rule rewards read. 18 of the 25 prompts
are for training (prompts.jsonl, each 4 times), the other 7 are held out (held_out.jsonl, each
twice; prefs_test.jsonl: the right answer against "I am not sure." and against a sum off by one).
The trainer tests build the same task (tests/trainer/conftest.py, `sums`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
PAIRS = [(a, b) for a in range(1, 6) for b in range(1, 6)]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write(out: Path, name: str, rows: list[dict]) -> None:
    (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sft = []
    for i in range(400):
        a, b = PAIRS[i % len(PAIRS)]
        reply = f"The answer is {a + b}." if rng.random() < 0.5 else "I am not sure."
        sft.append({"messages": user(f"What is {a} + {b}?") + [{"role": "assistant", "content": reply}]})
    pairs = PAIRS[:]
    random.Random(1).shuffle(pairs)
    prompts = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs]
    write(out, "sft.jsonl", sft)
    write(out, "prompts.jsonl", prompts[:18] * 4)
    write(out, "held_out.jsonl", prompts[18:] * 2)
    write(out, "prefs_test.jsonl", [
        {"prompt": p["prompt"], "chosen": f"The answer is {p['answer']}.", "rejected": rejected}
        for p in prompts[18:] for rejected in ("I am not sure.", f"The answer is {int(p['answer']) + 1}.")])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
