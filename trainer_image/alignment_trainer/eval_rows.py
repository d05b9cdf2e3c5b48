"""The eval stage's rows: held-out data as conversations, tokenized with completion masks.

Held-out rows come normalised by data.py for method eval: preference rows (prompt/chosen/
rejected as message lists) when every source is pairwise, else chats (`messages`). Each becomes
  pairs    {prompt, chosen, rejected} for preference accuracy,
  texts    (messages, first scored index) for the loss: only assistant turns from that index on count,
  prompts  the conversation up to the answer, for generations and the judge.
"""

from __future__ import annotations

from .prompts import until_last_answer
from .tokens import ChatEncoder
from .training import truncate_prompt


def split_rows(dataset) -> tuple[list[dict], list[tuple[list[dict], int]], list[list[dict]]]:
    """(pairs, texts, prompts) from the eval stage's normalised held-out split."""
    pairs, texts, prompts = [], [], []
    for row in dataset:
        if "chosen" in row:
            pairs.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
            texts.append((row["prompt"] + row["chosen"], len(row["prompt"])))
            prompts.append(row["prompt"])
        else:
            texts.append((row["messages"], 0))
            prompts.append(until_last_answer(row["messages"]))
    return pairs, texts, [p for p in prompts if p]


class Encoder:
    """messages -> (token ids, scored mask), cut the way the training stages cut them.

    The prompt (the turns before `scored_from`) is cut to max_prompt_length by
    training.truncate_prompt, as every training stage does, keeping its end; then the sequence is
    cut to max_length keeping its start (TRL's keep_start). Scoring is tokens.ChatEncoder's:
    the assistant replies from `scored_from` on, through their end-of-turn token.
    """

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None):
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length
        self.encode = ChatEncoder(tokenizer, max_length)

    def __call__(self, messages: list[dict], scored_from: int = 0) -> tuple[list[int], list[int]]:
        if self.max_prompt_length is not None and scored_from > 0:
            prompt = truncate_prompt(messages[:scored_from], self.tokenizer, self.max_prompt_length)
            messages, scored_from = prompt + messages[scored_from:], len(prompt)
        return self.encode(messages, scored_from)
