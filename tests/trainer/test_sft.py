"""SFT on a tiny model: the loss falls, the output dir has its documented layout, the trained
model stops at the end of its turn, and a finished stage is not trained twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def test_sft_loss_falls(sft_run, kit):
    losses = kit.losses(sft_run["output_dir"])
    assert len(losses) >= 5
    assert losses[-1] < 0.6 * losses[0], f"SFT loss did not fall: {losses}"


def test_sft_output_layout(sft_run, kit):
    out = Path(sft_run["output_dir"])
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (final / name).is_file(), name
    assert not list(out.glob("final.tmp-*")), "temporary final dir left behind"
    assert (out / "checkpoint-30" / "trainer_state.json").is_file()

    result = json.loads((out / "result.json").read_text())
    assert result == sft_run["result"]
    assert result["checkpoint"] == str(final) and result["global_step"] == 60
    assert result["eval_loss"] is not None and result["train_tokens_per_second"] > 0

    rows = kit.metrics(out)  # one line per logging step (plus the end-of-training and eval summaries)
    assert [r["step"] for r in rows if "loss" in r] == [1, *range(5, 61, 5)]
    card = (final / "README.md").read_text()
    assert "sft.jsonl (split train)" in card and "## Stage 1: sft (sft)" in card and "base_model_revision: main" in card
    assert str(out) not in card and "[None]" not in (out / "README.md").read_text()  # TRL's card replaced


def test_each_row_says_the_newest_checkpoint_and_the_work_at_risk(sft_run, kit):
    """save_steps 30 of 60, logging every 5: rows before the save name no checkpoint and their work at risk
    grows; from step 35 they name checkpoint 30 and the work at risk started again from its save."""
    rows = {r["step"]: r for r in kit.metrics(sft_run["output_dir"]) if "loss" in r}
    assert "checkpoint_step" not in rows[25] and rows[5]["work_at_risk_seconds"] <= rows[25]["work_at_risk_seconds"]
    assert rows[35]["checkpoint_step"] == 30 and rows[60]["checkpoint_step"] == 30  # 60's save comes after its log
    assert rows[35]["work_at_risk_seconds"] < rows[30]["work_at_risk_seconds"]
    assert rows[35]["checkpoint_time"] <= rows[35]["time"]


def test_termination_message_is_compact(tmp_path, sft_run):
    from alignment_trainer.outcome import TERMINATION_MESSAGE_LIMIT, encode

    written = (Path(sft_run["output_dir"]).parent / "termination-log").read_text()
    message = json.loads(written)
    assert message["checkpoint"].endswith("final") and message["global_step"] == 60
    assert message["eval_loss"] == sft_run["result"]["eval_loss"] and len(written) < 4096
    huge = {**sft_run["result"], "notes": "x" * 10_000}
    text = encode(huge)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT and json.loads(text)["checkpoint"]


def test_eos_stops_generation(sft_run, kit):
    """The trained model ends its answer with <|im_end|> and generate() stops there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = Path(sft_run["output_dir"]) / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == eos
    stops = model.generation_config.eos_token_id
    assert (stops[0] if isinstance(stops, list) else stops) == eos
    assert tokenizer.pad_token_id not in (None, eos)

    for subject in kit.test_subjects[:3]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {subject}."}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False)
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        assert eos in new, f"never stopped: {tokenizer.decode(new)!r}"
        assert new.index(eos) < 40 and new[-1] == eos, tokenizer.decode(new)


def test_rerun_of_finished_stage_exits_immediately(sft_run, kit, capsys):
    """Run again (a Job recreated after its trainer finished), the stage trains nothing and still says what it
    made in its termination message: the operator reads the stage's result from there, attempt by attempt."""
    from alignment_trainer import outcome

    before = (Path(sft_run["output_dir"]) / "metrics.jsonl").read_text()
    message = Path(sft_run["output_dir"]).parent / "termination-log"
    assert outcome.decode(message.read_text())["global_step"] == 60  # the first attempt's
    message.unlink()  # a new pod's is empty
    result = kit.run_in_process(sft_run["recipe"])
    assert result == sft_run["result"]
    assert any(e["event"] == "skipped" for e in kit.events(capsys.readouterr().out))
    assert (Path(sft_run["output_dir"]) / "metrics.jsonl").read_text() == before
    said = outcome.decode(message.read_text())
    assert said["global_step"] == 60 and said["checkpoint"] == sft_run["result"]["checkpoint"], said


def test_unknown_extra_arg_is_refused(tmp_path, tiny_model, data_dir, kit, capsys):
    from alignment_trainer.__main__ import main

    path = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                            training={"max_steps": 1, "extra_args": {"lerning_rate_typo": 1.0}})
    assert main([path]) == 2
    err = capsys.readouterr().err
    assert "training.extra_args.lerning_rate_typo" in err and "SFTConfig" in err

    path = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                            training={"max_steps": 1, "extra_args": {"learning_rate": 1.0}})
    assert main([path]) == 2
    assert "set training.learning_rate instead" in capsys.readouterr().err


def test_known_extra_arg_reaches_the_trl_config(tmp_path, tiny_model, data_dir, kit):
    from trl import SFTConfig

    from alignment_trainer.recipe import load_recipe
    from alignment_trainer.training import build_config

    path = kit.write_recipe(tmp_path, "sft", tiny_model, [str(data_dir / "sft.jsonl")],
                            training={"warmup_ratio": 0.25, "extra_args": {"packing_strategy": "wrapped",
                                                                           "max_grad_norm": 0.5}})
    config = build_config(SFTConfig, load_recipe(path))
    assert config.packing_strategy == "wrapped" and config.max_grad_norm == 0.5
    assert config.warmup_steps == 0.25  # transformers 5: a float below 1 is the warmup ratio
    assert config.report_to == ["tensorboard"]  # tracking's default; extraArgs cannot set report_to
