"""Reference log-probs outlive a stage: kept in a shared cache directory (the run volume's), keyed by
what determines them, reused by a later stage that asks for the same and recomputed when the key
changes. The eval stage keeps its reference scores the same way."""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_B = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}")


def dpo_stage(kit, directory, model, data_dir, cache, **training):
    model_section = {"model_name_or_path": model, "torch_dtype": "float32"}
    if "chat_template" in training:
        model_section["chat_template"] = training.pop("chat_template")
    path = kit.write_recipe(directory, "dpo", model, [str(data_dir / "prefs.jsonl")],
                            [str(data_dir / "prefs_test.jsonl")], cache_dir=str(cache),
                            training={"max_steps": 2, "learning_rate": 1e-4, "per_device_train_batch_size": 8,
                                      "max_length": 64, "logging_steps": 1, "save_steps": 100,
                                      "gradient_checkpointing": False, "precompute_ref_log_probs": True,
                                      **training})
    if model_section.get("chat_template"):
        import yaml

        doc = yaml.safe_load(Path(path).read_text())
        doc["model"] = model_section
        Path(path).write_text(yaml.safe_dump(doc))
    return kit.run_in_process(path)


def test_a_later_stage_reuses_cached_reference_logps_and_a_new_template_recomputes(tmp_path, sft_run, data_dir, kit):
    sft = str(Path(sft_run["output_dir"]) / "final")
    cache = tmp_path / "volume-cache"
    first = dpo_stage(kit, tmp_path / "cdpo", sft, data_dir, cache, loss_type="cdpo", label_smoothing=0.1)
    assert first["reference_logps"] == "computed"
    files = sorted(p.name for p in cache.glob("*.logps.arrow"))
    assert len(files) == 2 and {f.split("-")[0] for f in files} == {"train", "test"}

    # Another stage (another loss, beta and output directory) on the same reference, data and template
    second = dpo_stage(kit, tmp_path / "dpo", sft, data_dir, cache, beta=0.3)
    assert second["reference_logps"] == "reused"
    assert sorted(p.name for p in cache.glob("*.logps.arrow")) == files, "nothing new was written"
    assert second["reference_pass_s"] < first["reference_pass_s"]

    # The same stage with another chat template: the key changed, the log-probs are computed again
    third = dpo_stage(kit, tmp_path / "template", sft, data_dir, cache, chat_template=TEMPLATE_B)
    assert third["reference_logps"] == "computed"
    assert len(list(cache.glob("*.logps.arrow"))) == 4
    keys = [json.loads(p.read_text()) for p in cache.glob("*.key.json")]
    assert {k["chat_template"] == TEMPLATE_B for k in keys} == {True, False}


def test_a_second_eval_against_the_same_reference_reuses_its_scores(tmp_path, sft_run, tiny_model, data_dir, kit):
    sft = str(Path(sft_run["output_dir"]) / "final")
    cache = tmp_path / "volume-cache"
    results = []
    for name in ("eval-a", "eval-b"):
        path = kit.write_recipe(tmp_path / name, "eval", sft, [str(data_dir / "prefs_test.jsonl")],
                                cache_dir=str(cache), eval={"metrics": ["preference", "loss"], "reference_model": tiny_model},
                                training={"max_length": 64, "per_device_eval_batch_size": 16})
        results.append(kit.run_in_process(path))
    a, b = results
    assert (a["reference_logps_reused"], b["reference_logps_reused"]) == (False, True)
    for key in ("preference_accuracy", "reward_margin", "reference_logp_accuracy", "reference_eval_loss"):
        assert a[key] == b[key], key
