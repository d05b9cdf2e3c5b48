"""A reward stage's final/ as a scorer: the one way a trained reward model scores conversations.

final/ is a sequence-classification model with one label, saved with its tokenizer and chat
template; a conversation (prompt turns + the assistant's reply) is rendered with that template and
scored by the logit at its last token. Used by grpo's and label's reward_model rewards and by the
eval stage's eval.reward_model.
"""

from __future__ import annotations

import torch


class RewardModel:
    """`field`: where the recipe names the model, for the message when it is not a reward model."""

    def __init__(self, model_dir: str, field: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{field}: {model_dir} has {self.model.config.num_labels} labels, not a reward model "
                             "(a reward stage's final/ has one)")

    @torch.no_grad()
    def score(self, conversations: list[list[dict]], batch_size: int | None = None) -> list[float]:
        """One score per conversation, `batch_size` at a time (None: all in one batch)."""
        batch_size = batch_size or max(len(conversations), 1)
        scores: list[float] = []
        for start in range(0, len(conversations), batch_size):
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False)
                     for c in conversations[start:start + batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            scores += self.model(**enc).logits.squeeze(-1).float().tolist()
        return scores


def score_conversations(model_dir: str, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """A reward stage's final/ scores each conversation (eval.reward_model)."""
    return RewardModel(model_dir, "eval.reward_model").score(conversations, batch_size)
