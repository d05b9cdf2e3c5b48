"""GRPO (method grpo, TRL's GRPOTrainer) on a tiny learnable task: "What is a + b?" (conftest's `sums`).

The tiny model is first SFT'd on answers that give the sum half the time ("The answer is <a+b>.") and
are evasive the other half ("I am not sure."); sampled, it answers in that form about half the time
and is right well under that (its sums are shaky). GRPO with two rule rewards, the answer's form
(format) and its correctness (regex against the prompt's `answer`), on 18 of the 25 prompts must raise
the mean reward on the 7 it never trained on clearly: the form is what a ~1M-parameter model learns in
30 steps whatever the seed. (Correctness alone was a coin flip: on one 2-core AMD EPYC machine the
held-out reward went 0.071 -> 0.143 with seed 42, 0.062 with seed 0, 0.009 with seed 1, and lower with more
steps, where another machine had measured 0.250.) A reward that raises fails the stage naming the stage
and what to fix.
"""

from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.trainer


def grpo_recipe(kit, sums, name: str, rewards: list[dict], **training) -> str:
    d = sums["dir"]
    return kit.write_recipe(
        d / name, "grpo", sums["sft_final"], [str(d / "prompts.jsonl")], [str(d / "held_out.jsonl")],
        grpo={"rewards": rewards, "num_generations": 8, "max_completion_length": 24, "temperature": 0.7},
        training={"max_steps": 30, "learning_rate": 5e-4, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                  # max_length holds a prompt (33 tokens) and max_completion_length 24: grpo cuts prompts to fit
                  "per_device_train_batch_size": 16, "max_length": 64, "logging_steps": 5, "save_steps": 1000,
                  "gradient_checkpointing": False, "beta": 0.01, **training},
        tracking={"report_to": []})


ANSWER_FORM = {"kind": "format", "pattern": r"answer is \d+"}


def test_grpo_raises_held_out_reward(kit, sums):
    result = kit.run_in_process(grpo_recipe(kit, sums, "grpo", [ANSWER_FORM, sums["regex"]]))
    start, end = result["eval_mean_reward_start"], result["eval_mean_reward"]
    print(f"held-out mean reward: SFT start {start:.3f} -> GRPO {end:.3f} ({result['eval_prompts']} prompts)")
    # Measured (2 shared cores, 14 held-out prompts x 8 samples, the two rewards summed, at most 2): SFT
    # start 0.491 -> GRPO 1.170 (seed 42, the default), 0.464 -> 1.170 (seed 0), 0.509 -> 1.170 (seed 1).
    assert start < 0.8, start  # the SFT start answers in form only about half the time
    assert end >= start + 0.4, (start, end)
    out = sums["dir"] / "grpo" / "out"
    logged = kit.metrics(out)
    rewards = [m for m in logged if "reward" in m]
    assert rewards and "reward_std" in rewards[0] and "rewards/regex_answer/mean" in rewards[0]
    assert "frac_reward_zero_std" in rewards[0]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["when"] for s in samples} == {"start", "end"} and all("completion" in s for s in samples)
    assert (out / "final" / "config.json").is_file()


def test_a_reward_that_raises_names_the_stage(kit, sums, tmp_path):
    from alignment_trainer.__main__ import classify

    d = tmp_path  # not the session's shared sums dir: test_online checks what it holds
    bad = d / "null_answers.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": None}) + "\n" for a, b in sums["pairs"][:16]))
    path = kit.write_recipe(d / "bad", "grpo", sums["sft_final"], [str(bad)],
                            grpo={"rewards": [{"kind": "exact_match", "column": "answer"}], "num_generations": 4,
                                  "max_completion_length": 4},
                            training={"max_steps": 2, "per_device_train_batch_size": 8, "max_length": 48,
                                      "gradient_checkpointing": False}, stage_name="online-grpo",
                            tracking={"report_to": []})
    with pytest.raises(ValueError) as info:
        kit.run_in_process(path)
    failure = classify(info.value)
    assert failure["reason"] == "RecipeError" and failure["exit_code"] == 2
    assert "stage online-grpo" in failure["error"] and "grpo.rewards[0] (exact_match)" in failure["error"]
    assert "'answer'" in failure["error"] and "reference answer" in failure["error"]


def test_no_prompts_and_bad_batch_are_refused(kit, sums, tmp_path):
    from alignment_trainer.data import DataError

    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    path = kit.write_recipe(tmp_path / "e", "grpo", sums["sft_final"], [str(empty)],
                            grpo={"rewards": [sums["regex"]]}, stage_name="g", tracking={"report_to": []})
    with pytest.raises(DataError, match="stage g: no prompts in .*none.jsonl.*a grpo stage needs at least one prompt"):
        kit.run_in_process(path)
    path = kit.write_recipe(tmp_path / "b", "grpo", sums["sft_final"], [str(sums["dir"] / "prompts.jsonl")],
                            grpo={"rewards": [sums["regex"]], "num_generations": 3}, stage_name="g",
                            training={"per_device_train_batch_size": 8}, tracking={"report_to": []})
    with pytest.raises(ValueError, match="num_generations: 3 must divide"):
        kit.run_in_process(path)


def test_a_reward_that_never_varies_is_degraded_with_its_figure(kit, sums, tmp_path):
    """A rule reward that matches nothing gives every completion 0: every group's rewards tie
    (frac_reward_zero_std 1.0), nothing to learn. With guards.steps 2 the second logging step says so,
    with the figure (metrics.jsonl, the progress line, the push); not fatal by default: the stage ends."""
    never = {"kind": "regex", "column": "answer", "pattern": r"NEVER SAID (\d+)"}
    path = kit.write_recipe(tmp_path / "ties", "grpo", sums["sft_final"], [str(sums["dir"] / "prompts.jsonl")],
                            grpo={"rewards": [never], "num_generations": 4, "max_completion_length": 8},
                            training={"max_steps": 3, "per_device_train_batch_size": 8, "max_length": 48,
                                      "logging_steps": 1, "gradient_checkpointing": False},
                            guards={"steps": 2}, stage_name="ties", tracking={"report_to": []})
    kit.run_in_process(path)
    rows = {r["step"]: r for r in kit.metrics(tmp_path / "ties" / "out") if "frac_reward_zero_std" in r}
    assert [rows[s]["frac_reward_zero_std"] for s in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert "degraded/reward_ties" not in rows[1], "one logging step is not yet N"
    assert rows[2]["degraded/reward_ties"] == 1.0 and rows[3]["degraded/reward_ties"] == 1.0
