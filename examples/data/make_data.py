"""Write the example datasets in this folder (deterministic: the same files on every run).

    python examples/data/make_data.py          # rewrites examples/data/*.jsonl
    python examples/data/make_data.py OUT_DIR  # writes them elsewhere (the drift test compares)

Small templated tasks a ~1-3M-parameter model learns in minutes on a CPU: capitals of made-up
countries, adding two digits, colours of things, repeating a word, counting, greetings.

The preference signal is one "house style": a correct, polite, complete sentence. The SFT data
is deliberately of mixed quality, like scraped chat: most replies are in the house style, but
some are curt refusals ("I don't know.") and some SHOUT the answer, so an SFT model finds those
replies plausible too. Preference and KTO data then say which is better: chosen / desirable =
the house-style answer; rejected / undesirable = a refusal, the same answer shouted, or a
polite but wrong answer (another country's capital, a sum off by one or two, ...).

Held-out files (*_test.jsonl, prompts.jsonl) use prompts that never appear in the training
files, so a model has to generalise the style, not remember the rows.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
SEED = 0

CAPITALS = [("Zorvia", "Mellon"), ("Quenland", "Tarrow"), ("Brisca", "Holmfast"), ("Ostrel", "Vantry"),
            ("Pelmora", "Caskin"), ("Dravia", "Ulmet"), ("Kestin", "Farro"), ("Lumeria", "Gosk"),
            ("Merrowind", "Tilde"), ("Varkesh", "Oberlin"), ("Tamsol", "Ridgeby"), ("Elbania", "Corvo"),
            ("Fennick", "Sabel"), ("Grastow", "Penwick"), ("Hollin", "Marrowgate"), ("Istavia", "Lune"),
            ("Jorvale", "Brack"), ("Korrin", "Essel"), ("Yarrowmere", "Dunst"), ("Wendica", "Rook"),
            ("Ulvania", "Pollen"), ("Sarnet", "Kilby"), ("Rhyse", "Amberley"), ("Nolvos", "Trace")]
COLOURS = [("grass", "green"), ("snow", "white"), ("the sky", "blue"), ("coal", "black"),
           ("a banana", "yellow"), ("a tomato", "red"), ("a carrot", "orange"), ("an eggplant", "purple"),
           ("chocolate", "brown"), ("a lemon", "yellow"), ("milk", "white"), ("a cherry", "red")]
WORDS = ["apple", "river", "lantern", "garden", "pencil", "window", "candle", "forest", "button", "mirror",
         "rocket", "saddle", "tunnel", "violin", "walnut", "harbor", "island", "jacket", "kettle", "ladder",
         "meadow", "needle", "orchid", "pepper", "quiver", "ribbon", "silver", "teapot", "umbrella", "velvet",
         "wagon", "yellow", "zipper", "anchor", "basket", "castle", "dragon", "engine", "feather", "goblet",
         "hammer", "igloo", "jungle", "kitten", "lemon", "marble", "nutmeg", "oyster", "parrot", "puzzle",
         "rabbit", "sunset", "thunder", "unicorn", "valley", "whistle", "pillow", "blanket", "compass", "doorbell"]
GREETINGS = [("Hello!", "Hello! How can I help you today?", "Hi."),
             ("Good morning!", "Good morning! What can I do for you?", "Morning."),
             ("Thank you!", "You are welcome!", "Sure."),
             ("Goodbye!", "Goodbye, have a nice day!", "Bye."),
             ("How are you?", "I am well, thank you for asking.", "Fine."),
             ("Who are you?", "I am a helpful assistant.", "An assistant.")]
REFUSALS = ["I don't know.", "Ask someone else.", "No idea.", "Figure it out yourself.", "I can't help with that."]
SYSTEM = "You are a helpful assistant."


def tasks() -> list[dict]:
    """Every prompt with its house-style answer and its plausible wrong answers."""
    out = []
    capitals = [c for _, c in CAPITALS]
    for country, capital in CAPITALS:
        for prompt in (f"What is the capital of {country}?", f"Name the capital of {country}."):
            out.append(dict(prompt=prompt, answer=f"The capital of {country} is {capital}.", terse=f"{capital}.",
                            wrong=[f"The capital of {country} is {c}." for c in capitals if c != capital]))
    for a in range(1, 10):
        for b in range(1, 10):
            s = a + b
            out.append(dict(prompt=f"What is {a} plus {b}?", answer=f"{a} plus {b} is {s}.", terse=f"{s}.",
                            wrong=[f"{a} plus {b} is {s + d}." for d in (-2, -1, 1, 2) if s + d > 0]))
    colours = sorted({c for _, c in COLOURS})
    for thing, colour in COLOURS:
        subject = thing[0].upper() + thing[1:]
        for prompt in (f"What colour is {thing}?", f"Which colour is {thing}?"):
            out.append(dict(prompt=prompt, answer=f"{subject} is {colour}.", terse=f"{colour}.",
                            wrong=[f"{subject} is {c}." for c in colours if c != colour]))
    for word in WORDS:
        out.append(dict(prompt=f"Repeat the word: {word}", answer=f"Sure: {word}.", terse=word,
                        wrong=[f"Sure: {w}." for w in WORDS if w != word][:8]))
    for a in range(1, 21):
        seq = [a, a + 1, a + 2, a + 3]
        out.append(dict(prompt=f"Count from {a} to {a + 3}.", answer=", ".join(map(str, seq)) + ".",
                        terse=" ".join(map(str, seq)), wrong=[", ".join(map(str, [a, a + 1, a + 3, a + 4])) + ".",
                               ", ".join(map(str, [a, a + 2, a + 3, a + 4])) + "."]))
    for prompt, answer, terse in GREETINGS:
        out.append(dict(prompt=prompt, answer=answer, terse=terse, wrong=[]))
    return out


def shout(answer: str) -> str:
    return answer.rstrip(".!?").upper() + "!"


def bad_reply(task: dict, rng: random.Random) -> str:
    """A refusal (35%), a terse bare answer (35%), shouting (10%) or a polite wrong answer (20%)."""
    r = rng.random()
    if r < 0.35 or (r >= 0.8 and not task["wrong"]):
        return rng.choice(REFUSALS)
    if r < 0.7:
        return task["terse"]
    if r < 0.8:
        return shout(task["answer"])
    return rng.choice(task["wrong"])


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def sft_rows(pool: list[dict], n: int, rng: random.Random) -> list[dict]:
    """Chats: 65% house style, 12% refusals, 15% terse, 8% shouting; some with a system turn or a greeting first."""
    rows = []
    for _ in range(n):
        task = rng.choice(pool)
        r = rng.random()
        reply = (task["answer"] if r < 0.65 else rng.choice(REFUSALS) if r < 0.77 else task["terse"] if r < 0.92
                 else shout(task["answer"]))
        messages = [user(task["prompt"]), assistant(reply)]
        if rng.random() < 0.15:
            hello, hello_reply, _ = rng.choice(GREETINGS[:2])
            messages = [user(hello), assistant(hello_reply)] + messages
        if rng.random() < 0.2:
            messages = [{"role": "system", "content": SYSTEM}] + messages
        rows.append({"messages": messages})
    return rows


def pref_rows(pool: list[dict], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        task = pool[i % len(pool)] if i < len(pool) else rng.choice(pool)
        rows.append({"prompt": task["prompt"], "chosen": task["answer"], "rejected": bad_reply(task, rng)})
    rng.shuffle(rows)
    return rows


def kto_rows(pool: list[dict], n: int, rng: random.Random) -> list[dict]:
    """Exactly half desirable; prompts drawn independently for the two halves (unpaired)."""
    rows = [{"prompt": t["prompt"], "completion": t["answer"], "label": True}
            for t in (rng.choice(pool) for _ in range(n // 2))]
    rows += [{"prompt": t["prompt"], "completion": bad_reply(t, rng), "label": False}
             for t in (rng.choice(pool) for _ in range(n - n // 2))]
    rng.shuffle(rows)
    return rows


def write(out: Path, name: str, rows: list[dict]) -> None:
    with (out / name).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} rows")


def main(out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    everything = tasks()
    greetings = [t for t in everything if not t["wrong"]]
    rest = [t for t in everything if t["wrong"]]
    rng.shuffle(rest)
    # Held-out prompts: never in a training file. Greetings stay in training (too few to split).
    test_pool, train_pool = rest[:56], rest[56:] + greetings
    write(out, "sft.jsonl", sft_rows(train_pool, 400, rng))
    write(out, "sft_test.jsonl", sft_rows(test_pool, 50, rng))
    write(out, "prefs.jsonl", pref_rows(train_pool, 400, rng))
    write(out, "prefs_test.jsonl", pref_rows(test_pool, 60, rng))
    write(out, "kto.jsonl", kto_rows(train_pool, 400, rng))
    write(out, "kto_test.jsonl", kto_rows(test_pool, 60, rng))
    write(out, "prompts.jsonl", [{"prompt": t["prompt"]} for t in test_pool[:16]])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
