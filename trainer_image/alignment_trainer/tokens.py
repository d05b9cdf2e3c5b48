"""Chats as token ids with a mask of the tokens a model answers: the assistant replies.

One encoder for every template (ChatML, Zephyr's, Llama's, any a recipe sets): it renders the
conversation turn by turn through the chat template and tokenizes each new piece on its own,
the way TRL tokenizes a prompt and its completion, so the boundary between what the user (or
the template) wrote and what the assistant answers is exact without `{% generation %}`
markers in the template. A reply is scored from its first token through the end-of-turn token
(the tokenizer's eos, see model.load_tokenizer); the template's glue after it (ChatML's "\\n")
is not. SFT trains on exactly these tokens; the eval stage scores its loss on the same ones, and
the preference stages (CompletionEndsAtEndOfTurn) score their completions the same way.
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


def tokenize_prompt_completions(dataset, tokenizer):
    """A prompt/completion dataset (turns) -> input_ids + assistant_masks scoring the completion through
    its end-of-turn token, as tokenize_chats scores a chat's replies. TRL's SFTTrainer would score
    the completion as prompt+completion tokenized minus the prompt (TRL 1.16,
    trl/trainer/sft_trainer.py, _prepare_dataset's completion_mask), which with ChatML, Zephyr or
    Gemma templates includes the "\\n" after the end-of-turn token that generation never writes."""
    if dataset is None:
        return None
    encode = ChatEncoder(tokenizer)

    def row(example):
        ids, mask = encode(example["prompt"] + example["completion"], scored_from=len(example["prompt"]))
        return {"input_ids": ids, "assistant_masks": mask}

    return dataset.map(row, remove_columns=dataset.column_names,
                       desc="Masking prompts: loss on the completions through their end-of-turn token")


def through_end_of_turn(ids: list[int], eos_id: int | None) -> list[int]:
    """A reply's tokens through its first end-of-turn token (the tokenizer's eos); all when it has none."""
    if eos_id is None or eos_id not in ids:
        return ids
    return ids[:ids.index(eos_id) + 1]


class CompletionEndsAtEndOfTurn:
    """Mixin for TRL's DPOTrainer and KTOTrainer: each completion is scored through its end-of-turn
    token, as SFT trains replies and the eval stage scores them (ChatEncoder), not through the
    template's glue after it.

    Replaces (TRL 1.16, trl/trainer/dpo_trainer.py and kto_trainer.py, `_prepare_dataset`'s
    tokenize_fn) the completion TRL cuts from the rendered conversation: prompt+reply tokenized
    minus the prompt, which with ChatML, Zephyr or Gemma templates ends "<|im_end|>\\n", "</s>\\n",
    "<end_of_turn>\\n". That "\\n" is never generated (generation stops at the eos), and the
    policy's and reference's log-probs of it went into every reward: on the tiny ChatML pipeline
    it carried 31% of the held-out reward margin (benchmarks/post_eos_margin.py). TRL has no knob for it, so the token ids it made
    are cut here, after its own _prepare_dataset (which also runs for datasets evaluate() is given).
    """

    COMPLETION_COLUMNS = ("chosen_ids", "rejected_ids", "completion_ids", "KL_completion_ids")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        from trl.trainer.utils import global_then_local_main_first

        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        eos_id = getattr(processing_class, "tokenizer", processing_class).eos_token_id
        columns = [c for c in self.COMPLETION_COLUMNS if c in (dataset.column_names or [])]
        if eos_id is None or not columns:
            return dataset

        def cut(example):
            return {c: through_end_of_turn(example[c], eos_id) for c in columns}

        from datasets import Dataset

        kwargs = {"desc": f"Ending {dataset_name} completions at their end-of-turn token"} \
            if isinstance(dataset, Dataset) else {}  # IterableDataset.map has no desc
        with global_then_local_main_first():
            return dataset.map(cut, **kwargs)
