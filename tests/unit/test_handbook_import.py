"""`alignctl import handbook SFT.yaml DPO.yaml`: alignment-handbook recipes (both of its dataset
formats) become one AlignmentRun that validates, every training value carried where the run keeps
it, and each value it cannot carry named with why. The recipes here are written for the test in the
handbook's format (its zephyr-7b-beta sft/dpo config_full.yaml keys)."""

from __future__ import annotations

from pathlib import Path

import yaml

from alignment_operator.api import parse_run
from alignment_operator.cli import main as alignctl
from alignment_operator.render.recipe import build_recipe

TEMPLATE = "{% for m in messages %}\n{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}\n{% endfor %}"
SFT = {
    "model_name_or_path": "org/base-7b", "model_revision": "v2", "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2", "chat_template": TEMPLATE,
    "dataset_mixture": {"datasets": [
        {"id": "org/chats", "config": "default", "split": "train_sft", "columns": ["messages"], "weight": 1.0},
        {"id": "org/chats", "config": "default", "split": "test_sft", "columns": ["messages"], "weight": 0.5}],
        "test_split_size": 500, "seed": 0},
    "dataset_num_proc": 4, "bf16": True, "do_eval": True, "eval_strategy": "epoch", "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "hub_model_id": "base-sft", "learning_rate": 2.0e-5, "logging_steps": 5, "lr_scheduler_type": "cosine",
    "max_seq_length": 2048, "max_steps": -1, "num_train_epochs": 1, "output_dir": "data/base-sft",
    "per_device_train_batch_size": 16, "push_to_hub": True, "report_to": ["wandb"], "save_steps": 100,
    "save_total_limit": 1, "seed": 42, "warmup_ratio": 0.1, "frobnicate": 3,
}
DPO = {
    "model_name_or_path": "org/base-sft", "torch_dtype": None,
    "dataset_mixer": {"org/prefs": 1.0}, "dataset_splits": ["train_prefs", "test_prefs"],
    "beta": 0.01, "eval_steps": 100, "learning_rate": 5.0e-7, "lr_scheduler_type": "cosine", "max_length": 1024,
    "max_prompt_length": 512, "num_train_epochs": 1, "optim": "adamw_torch", "per_device_train_batch_size": 8,
    "loss_type": "sigmoid", "output_dir": "data/base-dpo", "seed": 42, "warmup_ratio": 0.1,
}


def imported(tmp_path: Path, capsys) -> tuple[dict, str, str]:
    (tmp_path / "sft.yaml").write_text("# Model arguments\n" + yaml.safe_dump(SFT, sort_keys=False))
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(DPO, sort_keys=False))
    out = tmp_path / "run.yaml"
    code = alignctl(["import", "handbook", str(tmp_path / "sft.yaml"), str(tmp_path / "dpo.yaml"), "--name", "zephyr",
                     "-o", str(out)])
    streams = capsys.readouterr()
    assert code == 0, streams.err
    return yaml.safe_load(out.read_text()), out.read_text(), streams.err


def test_every_training_value_lands_where_the_run_keeps_it(tmp_path, capsys):
    doc, _, _ = imported(tmp_path, capsys)
    run = parse_run(doc)
    assert (run.spec.model.source, run.spec.model.revision, run.spec.model.torch_dtype,
            run.spec.model.attn_implementation) == (
        "org/base-7b", "v2", "bfloat16", "flash_attention_2")
    assert run.spec.model.chat_template == TEMPLATE
    sft, dpo = run.spec.stages
    assert (sft.method, dpo.method, dpo.from_) == ("sft", "dpo", "sft")
    assert [(d.source, d.config, d.split, d.columns, d.weight) for d in sft.datasets] == [
        ("org/chats", None, "train_sft", ["messages"], 1.0), ("org/chats", None, "test_sft", ["messages"], 0.5)]
    assert sft.test_split_size == 500
    t = sft.training
    assert (t.learning_rate, t.num_train_epochs, t.max_steps, t.per_device_train_batch_size,
            t.gradient_accumulation_steps, t.max_length, t.lr_scheduler_type, t.warmup_ratio, t.seed, t.save_steps, t.save_total_limit) == (
        2.0e-5, 1, None, 16, 2, 2048, "cosine", 0.1, 42, 100, 1)
    assert t.completion_only_loss is False  # the handbook's SFT loss covers the whole chat
    assert t.extra_args == {"dataset_num_proc": 4, "do_eval": True, "eval_strategy": "epoch",
                            "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    # The older format: dataset_mixer + dataset_splits (train splits train, the others are held out).
    assert [(d.source, d.split) for d in dpo.datasets] == [("org/prefs", "train_prefs")]
    assert [(d.source, d.split) for d in dpo.test_datasets] == [("org/prefs", "test_prefs")]
    d = dpo.training
    assert (d.beta, d.learning_rate, d.max_length, d.max_prompt_length, d.eval_steps, d.loss_type) == (
        0.01, 5.0e-7, 1024, 512, 100, "sigmoid")
    assert d.extra_args == {"optim": "adamw_torch"}
    recipe = build_recipe(run, 1, "/workspace")  # DPO starts from SFT's output, not the published copy
    assert recipe.model.model_name_or_path.endswith("/sft/final") and recipe.training.beta == 0.01


def test_what_cannot_be_carried_is_named_with_why(tmp_path, capsys):
    _, text, err = imported(tmp_path, capsys)
    for line in ("sft: output_dir: 'data/base-sft' not carried (each stage writes to the run's volume)",
                 "sft: push_to_hub: True not carried", "sft: report_to: ['wandb'] not carried",
                 "sft: frobnicate: 3 not carried (not a field the run or TRL's SFTConfig accepts here)",
                 "sft: dataset_mixture.seed 0: not carried",
                 "dpo: torch_dtype: None not carried (one model setting per run: 'bfloat16'",
                 "dpo: model_name_or_path 'org/base-sft' replaced: the stage starts from sft's final model"):
        assert f"#   {line}" in text and f"note: {line}" in err, line
    assert "learning_rate" not in err and "beta" not in err  # carried values are not listed


def test_a_file_that_is_no_recipe_is_refused(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("kind: AlignmentRun\n")
    assert alignctl(["import", "handbook", str(tmp_path / "x.yaml")]) == 2
    assert "not an alignment-handbook recipe (no model_name_or_path)" in capsys.readouterr().err
