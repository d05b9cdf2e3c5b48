"""Chats as token ids with a mask of the tokens a model answers: the assistant replies.

One encoder for every template (ChatML, Zephyr's, Llama's, any a recipe sets): it renders the
conversation turn by turn through the chat template and tokenizes each new piece on its own,
the way TRL tokenizes a prompt and its completion, so the boundary between what the user (or
the template) wrote and what the assistant answers is exact without `{% generation %}`
markers in the template. A reply is scored from its first token through the end-of-turn token
(the tokenizer's eos, see model.load_tokenizer); the template's glue after it (ChatML's "\\n")
is not. SFT trains on exactly these tokens; the eval stage scores its loss on the same ones.
"""

from __future__ import annotations


class ChatEncoder:
    """messages -> (token ids, scored mask): assistant turns from `scored_from` on are scored."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.eos_id = tokenizer.eos_token_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, messages: list[dict], scored_from: int = 0) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        done = ""
        answers = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k >= scored_from]
        for k in answers:
            for text, scored in ((self._render(messages[:k], True), False), (self._render(messages[:k + 1], False), True)):
                if not text.startswith(done):
                    raise ValueError("model.chat_template: rendering a conversation turn by turn changes its "
                                     "earlier turns, so answers cannot be told from prompts")
                piece = self._ids(text[len(done):])
                ids += piece
                mask += self._reply_mask(piece) if scored else [0] * len(piece)
                done = text
        if answers and answers[-1] < len(messages) - 1:  # turns after the last scored reply: context only
            rest = self._ids(self._render(messages, False)[len(done):])
            ids, mask = ids + rest, mask + [0] * len(rest)
        if self.max_length is not None:
            ids, mask = ids[:self.max_length], mask[:self.max_length]
        return ids, mask

    def _reply_mask(self, piece: list[int]) -> list[int]:
        """Score a reply through its end-of-turn token; what the template writes after it is glue."""
        if self.eos_id in piece:
            end = piece.index(self.eos_id) + 1
            return [1] * end + [0] * (len(piece) - end)
        return [1] * len(piece)


def tokenize_chats(dataset, tokenizer, desc: str = "Masking prompts: loss on assistant replies only"):
    """A `messages` dataset -> input_ids + assistant_masks, which TRL's SFTTrainer turns into labels
    (-100 outside the replies), truncates to max_length and drops when nothing is left to train."""
    if dataset is None:
        return None
    encode = ChatEncoder(tokenizer)

    def row(example):
        ids, mask = encode(example["messages"])
        return {"input_ids": ids, "assistant_masks": mask}

    return dataset.map(row, remove_columns=dataset.column_names, desc=desc)
