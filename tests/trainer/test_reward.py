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


def test_an_eval_stage_scores_pairs_and_generations_with_a_reward_stages_model(tmp_path, tiny_model, data_dir, kit):
    path = kit.write_recipe(tmp_path / "rm", "reward", tiny_model, [str(data_dir / "prefs.jsonl")],
                            training={"max_steps": 20, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
                                      "max_length": 64, "save_steps": 20, "gradient_checkpointing": False})
    rm = kit.run_in_process(path)["checkpoint"]
    path = kit.write_recipe(tmp_path / "eval", "eval", tiny_model, [str(data_dir / "prefs_test.jsonl")],
                            eval={"metrics": ["preference", "generations"], "reference_model": tiny_model,
                                  "reward_model": rm, "num_generations": 4, "max_new_tokens": 8},
                            training={"max_length": 64, "per_device_eval_batch_size": 16})
    result = kit.run_in_process(path)
    assert result["reward_model_accuracy"] >= 0.9, "the reward model ranks the held-out pairs"
    assert 0.0 <= result["reward_model_win_rate"] <= 1.0
    assert {"reward_model_score", "reference_reward_model_score"} <= set(result)
