"""method reward: a Bradley-Terry reward model on pairs (TRL's RewardTrainer) that later stages load."""

from __future__ import annotations

from pathlib import Path

import torch


def test_reward_model_ranks_held_out_pairs_and_final_is_a_sequence_classifier(tmp_path, tiny_model, data_dir, kit):
    path = kit.write_recipe(tmp_path, "reward", tiny_model, [str(data_dir / "prefs.jsonl")],
                            [str(data_dir / "prefs_test.jsonl")],
                            training={"max_steps": 30, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
                                      "per_device_eval_batch_size": 16, "max_length": 64, "logging_steps": 10,
                                      "save_steps": 30, "gradient_checkpointing": False})
    result = kit.run_in_process(path)
    # The held-out subjects never appear in training: the model must rank helpful over curt replies.
    assert result["eval_pairs"] == 32
    assert result["eval_pairwise_accuracy"] >= 0.9, result
    assert result["eval_reward_margin"] > 0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = Path(result["checkpoint"])
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    prompt = [{"role": "user", "content": "Tell me about coffee."}]
    texts = [tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
             for reply in ("Sure! Here is a short note about coffee: they are interesting.", "Go away.")]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        good, bad = model(**enc).logits.squeeze(-1).tolist()
    assert good > bad, "final/ loads as a reward model that prefers the helpful reply"
