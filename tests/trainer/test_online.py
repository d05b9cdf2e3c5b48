"""An online round as HALOs runs one (sample -> label -> train), as three stages: generate, label, dpo.

On conftest's sums task ("What is a + b?"): the SFT'd tiny model samples 8 completions for each of
the 18 training prompts (generate); a rule reward scores them, 1 for the right number after "answer
is" plus 0.5 for answering in that form at all, and the best and worst completion of each prompt
become a DPO pair (label); DPO trains on the pairs against the SFT model. The held-out mean reward
(the 7 prompts no stage trained on, sampled and scored by the same two stages) must rise clearly
above the SFT model's. A label reward that raises, a generate stage with no prompts and vLLM asked
for where there is none fail naming the stage and what to fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer
SAMPLING = {"num_generations": 8, "max_completion_length": 24, "temperature": 0.7}
FORMAT = {"kind": "format", "pattern": r"^The answer is \d+", "weight": 0.5}


def generate(kit, sums, name: str, model: str, prompts: str, **generate_args) -> dict:
    path = kit.write_recipe(sums["dir"] / name, "generate", model, [prompts], stage_name=name,
                            generate={**SAMPLING, **generate_args}, tracking={"report_to": []})
    return kit.run_in_process(path)


def label(kit, sums, name: str, generations: str, rewards: list[dict], **label_args) -> dict:
    path = kit.write_recipe(sums["dir"] / name, "label", sums["sft_final"], [generations], stage_name=name,
                            label={"rewards": rewards, **label_args}, tracking={"report_to": []})
    return kit.run_in_process(path)


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_one_online_round_raises_held_out_reward(kit, sums):
    from alignment_trainer.data import normalise_preference, normalise_unpaired

    d, rewards = sums["dir"], [sums["regex"], FORMAT]
    # The round: sample from the SFT model, label best vs worst, DPO against the SFT model.
    gen = generate(kit, sums, "gen-1", sums["sft_final"], str(d / "prompts.jsonl"))
    generated = rows(gen["dataset"])
    assert (gen["prompts"], gen["completions"], len(generated)) == (72, 72 * 8, 72)
    assert all(len(r["completions"]) == 8 and r["answer"] and r["prompt"][0]["role"] == "user" for r in generated)
    before = Path(gen["dataset"]).stat().st_mtime_ns  # a rerun of a finished stage samples nothing again
    assert generate(kit, sums, "gen-1", sums["sft_final"], str(d / "prompts.jsonl")) == gen
    assert Path(gen["dataset"]).stat().st_mtime_ns == before

    lab = label(kit, sums, "label-1", gen["dataset"], rewards)
    pairs = rows(lab["dataset"])
    assert lab["pairs"] == len(pairs) > 30 and lab["pairs"] + lab["tied_prompts"] + lab["unfinished_prompts"] == 72
    for p in pairs:
        a, b = map(int, re.findall(r"\d+", p["prompt"][0]["content"]))
        right = re.match(rf"^The answer is {a + b}(?!\d)", p["chosen"][0]["content"]) is not None
        assert p["score_chosen"] > p["score_rejected"] and (p["score_chosen"] >= 1) == right, p
    assert len(normalise_preference(pairs)) == len(pairs)  # what the dpo stage reads

    dpo = kit.write_recipe(d / "dpo-1", "dpo", sums["sft_final"], [lab["dataset"]], stage_name="dpo-1",
                           ref_model=sums["sft_final"],
                           training={"num_train_epochs": 2, "learning_rate": 3e-4, "beta": 0.1,
                                     "per_device_train_batch_size": 8, "max_length": 96, "max_prompt_length": 48,
                                     "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "logging_steps": 5,
                                     "save_steps": 1000, "gradient_checkpointing": False},
                           tracking={"report_to": []})
    trained = kit.run_in_process(dpo)

    # Held out: the SFT start and the DPO model, sampled alike, labelled alike (binary, for KTO).
    held_out = str(d / "held_out.jsonl")
    scored = {}
    for who, model in (("start", sums["sft_final"]), ("after", trained["checkpoint"])):
        g = generate(kit, sums, f"{who}-gen", model, held_out)
        scored[who] = label(kit, sums, f"{who}-label", g["dataset"], rewards, feedback="binary", threshold=0.25)
    start, after = scored["start"], scored["after"]
    right = "rewards/regex_answer/mean"
    print(f"online round (generate -> label -> dpo, {lab['pairs']} pairs): held-out mean reward "
          f"SFT {start['mean_reward']:.3f} -> DPO {after['mean_reward']:.3f}; right answers {start[right]:.3f} -> "
          f"{after[right]:.3f}; in the answer format {start['rewards/format/mean']:.3f} -> "
          f"{after['rewards/format/mean']:.3f} (7 prompts x 2 x 8 samples)")
    # Measured (2 shared cores): SFT 0.281 -> DPO 0.589 (seeds 1, 2 of the DPO stage: 0.563, 0.585).
    assert start["mean_reward"] < 0.5, start
    assert after["mean_reward"] >= start["mean_reward"] + 0.15, (start["mean_reward"], after["mean_reward"])
    assert after[right] > start[right], (start[right], after[right])
    # The eval stage reports the same kind of figure: both models' greedy answers, scored by the rewards.
    ev = kit.run_in_process(kit.write_recipe(
        d / "eval", "eval", trained["checkpoint"], [], stage_name="eval", tracking={"report_to": []},
        eval={"metrics": [], "reference_model": sums["sft_final"], "prompts": {"path": held_out}, "rewards": rewards,
              "max_new_tokens": 24}))
    print(f"eval stage, greedy answers to the held-out prompts: mean reward SFT {ev['reference_mean_reward']:.3f} "
          f"-> DPO {ev['mean_reward']:.3f} ({ev['reward_prompts']} prompts)")
    assert ev["reward_prompts"] == 14 and ev["mean_reward"] > ev["reference_mean_reward"], ev
    feedback = rows(after["dataset"])
    assert len(normalise_unpaired(feedback)) == len(feedback) == after["desirable"] + after["undesirable"]
    assert all(r["label"] == (r["score"] > 0.25) for r in feedback)


def test_a_label_reward_that_raises_names_the_stage(kit, sums, tmp_path):
    from alignment_trainer.__main__ import classify

    bad = tmp_path / "generations.jsonl"
    bad.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                                       "completions": ["The answer is 3.", "I am not sure."], "answer": None}) + "\n"
                           for a, b in sums["pairs"][:4]))
    with pytest.raises(ValueError) as info:
        label(kit, sums, "bad-label", str(bad), [{"kind": "exact_match", "column": "answer"}])
    failure = classify(info.value)
    assert failure["reason"] == "RecipeError" and failure["exit_code"] == 2
    assert "stage bad-label: label.rewards[0] (exact_match) raised" in failure["error"]
    assert "'answer'" in failure["error"] and "reference answer" in failure["error"]


def test_generate_refuses_no_prompts_and_absent_vllm(kit, sums, tmp_path):
    from alignment_trainer.data import DataError

    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"stage gen-empty: no prompts in .*none.jsonl.*needs at least one row with "
                                        r"a `prompt`.*fix datasets"):
        generate(kit, sums, "gen-empty", sums["sft_final"], str(empty))
    path = kit.write_recipe(tmp_path / "short", "generate", sums["sft_final"], [str(sums["dir"] / "held_out.jsonl")],
                            generate=SAMPLING, training={"max_prompt_length": 5}, tracking={"report_to": []})
    with pytest.raises(ValueError, match="training.max_prompt_length: 5 tokens cannot hold even the chat template"):
        kit.run_in_process(path)  # prompts are cut like the training stages cut them
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match="generate.use_vllm: vllm is not installed in this image; set it false"):
            generate(kit, sums, "gen-vllm", sums["sft_final"], str(sums["dir"] / "held_out.jsonl"), use_vllm=True)


def test_the_example_sums_files_are_what_their_generator_writes(sums):
    """examples/online-tiny-run.yaml reads the committed files; the tests read the generator's."""
    written = sorted(p.name for p in sums["dir"].glob("*.jsonl"))
    assert written == ["held_out.jsonl", "prefs_test.jsonl", "prompts.jsonl", "sft.jsonl"]
    for name in written:
        assert (sums["dir"] / name).read_bytes() == (sums["committed"] / name).read_bytes(), f"{name} drifted"


def numbers_score_9(body: dict) -> str:
    """Grades 9 an answer giving a number, else 2."""
    answer = body["messages"][1]["content"].split("[The Start of Assistant's Answer]\n")[1]
    grade = 9 if re.match(r"The answer is \d", answer) else 2
    return f"Fine. Rating: [[{grade}]]"


def test_a_judge_reward_labels_and_an_unreachable_judge_names_the_stage(kit, sums, tmp_path, monkeypatch, fake_judge):
    import socket

    from alignment_trainer.__main__ import classify

    monkeypatch.setenv("LABEL_REWARD_0_JUDGE_API_KEY", "sk-test-not-a-secret")
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                                               "completions": ["I am not sure.", f"The answer is {a + b}."]}) + "\n"
                                   for a, b in sums["pairs"][:3]))
    judge = {"base_url": fake_judge(numbers_score_9).url, "model": "fake-judge",
             "api_key_env": "LABEL_REWARD_0_JUDGE_API_KEY", "max_retries": 1, "timeout_seconds": 10}
    lab = label(kit, sums, "judge-label", str(generations), [{"kind": "judge", "judge": judge}])
    from alignment_trainer.data import DataError

    with pytest.raises(DataError, match=r"stage judge-margin: no prompt's best completion beats its worst by "
                                        r"more than label.min_margin 0.8"):
        label(kit, sums, "judge-margin", str(generations), [{"kind": "judge", "judge": judge}], min_margin=0.8)
    pairs = rows(lab["dataset"])
    assert lab["pairs"] == 3 and lab["rewards/judge/mean"] == pytest.approx((0.9 + 0.2) / 2)
    assert all(p["chosen"][0]["content"].startswith("The answer is") and p["score_chosen"] == 0.9 for p in pairs)

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(RuntimeError) as info:
        label(kit, sums, "judge-down", str(generations),
              [{"kind": "judge", "judge": {**judge, "base_url": f"http://127.0.0.1:{closed}/v1"}}])
    failure = classify(info.value)
    assert failure["exit_code"] == 1, failure  # retryable: the endpoint may come back
    assert f"stage judge-down: label.rewards[0] (judge): cannot reach http://127.0.0.1:{closed}/v1" in failure["error"]
    assert "check label.rewards[0].judge (baseUrl, model, its API key)" in failure["error"]
    assert "sk-test-not-a-secret" not in failure["error"]
    monkeypatch.delenv("LABEL_REWARD_0_JUDGE_API_KEY")
    with pytest.raises(ValueError, match=r"stage judge-nokey: label.rewards\[0\] \(judge\): environment variable "
                                         r"LABEL_REWARD_0_JUDGE_API_KEY \(the judge's API key\) is not set"):
        label(kit, sums, "judge-nokey", str(generations), [{"kind": "judge", "judge": judge}])


def test_generate_keeps_only_the_selected_columns(kit, sums, tmp_path):
    import yaml

    path = kit.write_recipe(tmp_path / "g", "generate", sums["sft_final"], [str(sums["dir"] / "held_out.jsonl")],
                            generate={**SAMPLING, "num_generations": 2}, tracking={"report_to": []})
    recipe = yaml.safe_load(Path(path).read_text())
    recipe["datasets"][0]["columns"] = ["prompt"]
    Path(path).write_text(yaml.safe_dump(recipe))
    out = rows(kit.run_in_process(path)["dataset"])
    assert len(out) == 14 and all(set(r) == {"prompt", "completions", "stopped"} and len(r["completions"]) == 2
                                  for r in out)


def test_two_processes_split_the_prompts_and_write_one_dataset_in_order(kit, sums, tmp_path):
    from alignment_trainer.launch import build_launch_command, launch_env

    held_out = sums["dir"] / "held_out.jsonl"
    path = kit.write_recipe(tmp_path / "g2", "generate", sums["sft_final"], [str(held_out)], stage_name="g2",
                            generate={**SAMPLING, "num_generations": 3}, tracking={"report_to": []})
    proc = kit.run_subprocess(build_launch_command(path, "ddp", 2, cpu=True), env=launch_env(cpu=True))
    started = next(e for e in kit.events(proc.stdout) if e["event"] == "start")
    assert started["processes"] == 2
    out = tmp_path / "g2" / "out"
    written = rows(str(out / "final" / "generations.jsonl"))
    asked = rows(str(held_out))
    assert [(r["prompt"][0]["content"], r["answer"]) for r in written] == [(r["prompt"], r["answer"]) for r in asked]
    assert all(len(r["completions"]) == 3 for r in written)
    assert not list(out.glob("generations.part-*")), "the shares are removed once merged"
