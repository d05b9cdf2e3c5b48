"""Preference stages on the tiny model: DPO learns a preference that holds on unseen prompts;
IPO (with precomputed reference log-probs), SimPO and ORPO run end to end; KTO trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def test_dpo_lifts_heldout_reward_accuracy(tmp_path, sft_run, data_dir, kit):
    """Starting from the SFT stage's final/, as a pipeline does; held-out subjects never trained on."""
    start = str(Path(sft_run["output_dir"]) / "final")
    path = kit.write_recipe(tmp_path, "dpo", start, [str(data_dir / "prefs.jsonl")],
                            [str(data_dir / "prefs_test.jsonl")],
                            training={"max_steps": 30, "learning_rate": 1e-3, "beta": 0.1,
                                      "per_device_train_batch_size": 8, "max_length": 64, "max_prompt_length": 24,
                                      "logging_steps": 5, "save_steps": 100})
    result = kit.run_in_process(path)
    assert result["eval_rewards/accuracies"] >= 0.75, result
    assert result["eval_rewards/margins"] > 0, result
    losses = kit.losses(tmp_path / "out")
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)  # policy == reference at step 1
    assert losses[-1] < 0.5 * losses[0], losses
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == result


@pytest.mark.parametrize("method,training", [
    ("ipo", {"precompute_ref_log_probs": True}),
    ("simpo", {"beta": 2.0, "extra_args": {"simpo_gamma": 0.5}}),
    ("orpo", {}),
])
def test_other_pairwise_methods_train(tmp_path, tiny_model, data_dir, kit, method, training):
    path = kit.write_recipe(tmp_path, method, tiny_model, [str(data_dir / "prefs.jsonl")],
                            training={"max_steps": 4, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                                      "max_length": 64, "logging_steps": 1, "save_steps": 100, **training})
    result = kit.run_in_process(path)
    assert result["global_step"] == 4 and math.isfinite(result["train_loss"])
    assert result["rewards/accuracies"] is not None
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_reference_free_methods_refuse_reference_options(tmp_path, tiny_model, data_dir, kit, capsys):
    from alignment_trainer.__main__ import main

    path = kit.write_recipe(tmp_path, "orpo", tiny_model, [str(data_dir / "prefs.jsonl")],
                            training={"max_steps": 1, "precompute_ref_log_probs": True})
    assert main([path]) == 2
    assert "orpo has no reference model" in capsys.readouterr().err


def test_method_missing_from_installed_trl_fails_clearly(monkeypatch):
    import sys

    from alignment_trainer.stages.dpo import trainer_classes

    monkeypatch.setitem(sys.modules, "trl.experimental.orpo", None)  # as if this TRL had no ORPO
    with pytest.raises(ValueError, match="method orpo: not available in the installed TRL"):
        trainer_classes("orpo")


def test_kto_trains(tmp_path, tiny_model, data_dir, kit):
    from transformers import AutoModelForCausalLM

    path = kit.write_recipe(tmp_path, "kto", tiny_model, [str(data_dir / "kto.jsonl")],
                            training={"max_steps": 24, "learning_rate": 1e-3, "beta": 0.1,
                                      "per_device_train_batch_size": 8, "max_length": 64, "logging_steps": 4,
                                      "save_steps": 100})
    result = kit.run_in_process(path)
    losses = kit.losses(tmp_path / "out")
    assert all(math.isfinite(x) for x in losses) and len(losses) >= 5
    assert losses[-1] < losses[0], losses
    assert result["rewards/margins"] > 0, result
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert model.config.eos_token_id is not None
