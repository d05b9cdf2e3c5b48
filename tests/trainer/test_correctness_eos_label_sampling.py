"""Issue 24, items 2, 4 and 9: what is scored ends at the end-of-turn token, unfinished samples are
never chosen, and sampling uses exactly the recipe's settings. Each test fails on 73214b4.

- DPO/IPO/cDPO/ipo_sum and KTO score each reply through its end-of-turn token (TRL's completion
  ended "<|im_end|>\\n"), and the eval stage's reward margin equals the DPO run's held-out margin;
- SFT on prompt/completion rows trains the completion through its end-of-turn token, as chats;
- label never chooses (nor labels desirable) a completion generate cut at max_completion_length;
- generate and eval sample with the recipe's settings, not the checkpoint's generation_config;
- grpo applies training.max_length and max_prompt_length (TRL's GRPOConfig has neither);
- the vLLM path gives token prompts (one bos) and stops at the end-of-turn token.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(method: str, model: str, datasets: list[str], out: Path, test: list[str] | None = None,
            sections: dict | None = None, **training):
    from alignment_trainer.recipe import Recipe

    return Recipe.model_validate({
        "method": method, "model": {"model_name_or_path": model, "torch_dtype": "float32"},
        "datasets": [{"path": p} for p in datasets], "output_dir": str(out),
        "test_datasets": [{"path": p} for p in test or []], **(sections or {}),
        "training": {"gradient_checkpointing": False, "max_length": 96, "per_device_train_batch_size": 8,
                     "logging_steps": 1, "save_steps": 1000, **training}})


# ---------------------------------------------------------------------------- item 2: post-EOS glue

@pytest.mark.parametrize("method, data, columns", [
    ("dpo", "prefs.jsonl", ("chosen_ids", "rejected_ids")),
    ("kto", "kto.jsonl", ("completion_ids", "KL_completion_ids")),
])
def test_preference_completions_end_at_the_end_of_turn_token(tmp_path, tiny_model, data_dir, method, data, columns):
    """The token ids TRL's DPOTrainer/KTOTrainer score end with the end-of-turn token: ChatML's
    "\\n" after <|im_end|> (TRL 1.16's completion) is not among them, in training and held-out rows."""
    from alignment_trainer.stages import dpo, kto

    stage = dpo if method == "dpo" else kto
    recipe = _recipe(method, tiny_model, [str(data_dir / data)], tmp_path / "out", test=[str(data_dir / data)],
                     max_steps=1)
    trainer, tokenizer = stage.build(recipe)
    eos = tokenizer.eos_token_id
    for split in (trainer.train_dataset, trainer.eval_dataset):
        for row in split.select(range(8)):
            for column in columns:
                ids = row[column]
                assert ids[-1] == eos and ids.count(eos) == 1, tokenizer.decode(ids)
    reply = trainer.train_dataset[0][columns[0]]
    assert not tokenizer.decode(reply).endswith("\n")


def test_eval_stage_margin_equals_the_dpo_runs_held_out_margin(tmp_path, tiny_model, data_dir):
    """DPO trains 4 steps and evaluates its held-out pairs (TRL's eval_rewards/margins); the eval stage
    scores the same pairs (tokens.ChatEncoder) with the same beta and lengths: the margins agree within
    1e-3 (before: they differed by the part the "\\n" after <|im_end|> carried)."""
    from alignment_trainer.stages import dpo, eval as eval_stage

    test = str(data_dir / "prefs_test.jsonl")  # 32 pairs: 4 eval batches of 8 (TRL averages batch means)
    recipe = _recipe("dpo", tiny_model, [str(data_dir / "prefs.jsonl")], tmp_path / "dpo", test=[test],
                     max_steps=4, learning_rate=2e-3, per_device_eval_batch_size=8, max_prompt_length=48)
    result = dpo.run(recipe)
    ev = eval_stage.run(_recipe("eval", result["checkpoint"], [test], tmp_path / "eval",
                                sections={"eval": {"metrics": ["preference"], "reference_model": tiny_model}},
                                beta=recipe.training.beta, max_prompt_length=48))
    assert ev["scored_pairs"] == 32
    assert abs(result["eval_rewards/margins"]) > 0.01, "DPO moved the margin: the comparison means something"
    assert ev["reward_margin"] == pytest.approx(result["eval_rewards/margins"], abs=1e-3)


def test_sft_prompt_completion_rows_train_through_the_end_of_turn_only(tmp_path, tiny_model):
    """As SFT on chats: the completion's tokens through <|im_end|>, not the "\\n" the template writes after."""
    from alignment_trainer.stages import sft

    pc = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Tell me about cats.", "completion": "Cats purr."}] * 4)
    trainer, tokenizer = sft.build(_recipe("sft", tiny_model, [pc], tmp_path / "out", max_steps=1))
    row = trainer.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "Cats purr." + tokenizer.eos_token
    assert "Tell me about cats." in tokenizer.decode(row["input_ids"])


# ---------------------------------------------------------------------------- item 4: unfinished samples

def _generations(tmp_path: Path) -> str:
    def row(a, b, completions, stopped):
        return {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b),
                "completions": completions, "stopped": stopped}

    return _jsonl(tmp_path / "generations.jsonl", [
        # the best-scoring completion was cut short: the finished one of the same score is chosen
        row(2, 3, ["The answer is 5 because two and", "The answer is 5.", "I am not sure."], [False, True, True]),
        # nothing finished: no pair
        row(1, 1, ["The answer is 2 and", "I am not"], [False, False]),
        # only the unfinished one is right: no finished completion beats another
        row(2, 2, ["The answer is 4 since", "I am not sure.", "Maybe 3."], [False, True, True]),
    ])


def test_label_never_chooses_an_unfinished_completion(tmp_path, tiny_model):
    from alignment_trainer.stages import label

    reward = {"kind": "regex", "column": "answer", "pattern": r"answer is (\d+)"}
    path = _generations(tmp_path)
    pairs = label.run(_recipe("label", tiny_model, [path], tmp_path / "pairs",
                              sections={"label": {"rewards": [reward]}}))
    written = [json.loads(line) for line in Path(pairs["dataset"]).read_text().splitlines()]
    assert [r["chosen"][0]["content"] for r in written] == ["The answer is 5."]
    assert written[0]["rejected"][0]["content"] == "I am not sure."
    assert (pairs["pairs"], pairs["unfinished_prompts"], pairs["tied_prompts"]) == (1, 1, 1)
    assert (pairs["unfinished_completions"], pairs["unfinished_best"]) == (4, 3)

    binary = label.run(_recipe("label", tiny_model, [path], tmp_path / "binary",
                               sections={"label": {"rewards": [reward], "feedback": "binary"}}))
    rows = [json.loads(line) for line in Path(binary["dataset"]).read_text().splitlines()]
    desirable = [r["completion"][0]["content"] for r in rows if r["label"]]
    assert desirable == ["The answer is 5."], "an unfinished completion is never desirable"
    assert "I am not" in [r["completion"][0]["content"] for r in rows if not r["label"]]  # unfinished, undesirable
    assert binary["unfinished_above_threshold"] == 3


# ---------------------------------------------------------------------------- item 9: sampling, lengths, vLLM

def test_generation_uses_the_recipes_settings_not_the_checkpoints(tiny_model):
    """A checkpoint whose generation_config carries repetition_penalty and no_repeat_ngram_size (as
    Instruct models ship one) is answered greedily by the plain argmax, and the settings are reported."""
    import torch

    from alignment_trainer.model import load_model, load_tokenizer
    from alignment_trainer import sampling
    from alignment_trainer.recipe import ModelArgs

    args = ModelArgs(model_name_or_path=tiny_model, torch_dtype="float32")
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer).eval()
    prompt = [{"role": "user", "content": "Tell me about cats."}]
    ids = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    argmax = []
    with torch.no_grad():
        for _ in range(16):
            token = int(model(input_ids=torch.tensor([ids + argmax])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            argmax.append(token)
    assert len(set(argmax)) < len(argmax), "the random model repeats itself: a repetition penalty would change it"

    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    answer = sampling.generate(model, tokenizer, [prompt], 16, 1, "test")[0]
    assert answer["text"] == tokenizer.decode(argmax, skip_special_tokens=True).strip()
    assert sampling.ignored_generation_settings(model) == {"repetition_penalty": 5.0, "no_repeat_ngram_size": 1}
    assert model.generation_config.repetition_penalty == 5.0, "the checkpoint's config is restored"


def test_grpo_applies_max_length_and_max_prompt_length(tmp_path, tiny_model):
    """TRL's GRPOConfig has neither: prompts are cut (keeping their end) to max_prompt_length and to
    max_length - max_completion_length; a max_length with no room for a prompt is refused."""
    from alignment_trainer.model import load_tokenizer
    from alignment_trainer.stages import grpo
    from alignment_trainer.training import _prompt_length

    long = [{"role": "user", "content": "Tell me about cats. " * 4}, {"role": "assistant", "content": "Cats purr."},
            {"role": "user", "content": "And dogs?"}]
    path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": long, "answer": "x"}] * 8)
    section = {"grpo": {"rewards": [{"kind": "contains", "column": "answer"}], "num_generations": 4,
                        "max_completion_length": 24}}
    tokenizer = load_tokenizer(_recipe("grpo", tiny_model, [path], tmp_path / "a", sections=section).model)
    assert _prompt_length(tokenizer, long) > 20
    for lengths, limit in (({"max_length": 44}, 20), ({"max_length": 96, "max_prompt_length": 20}, 20)):
        trainer = grpo.build(_recipe("grpo", tiny_model, [path], tmp_path / "a", sections=section,
                                     per_device_train_batch_size=4, max_steps=1, **lengths))[0]
        prompt = trainer.train_dataset[0]["prompt"]
        assert prompt == long[2:] and _prompt_length(tokenizer, prompt) <= limit, lengths
    with pytest.raises(ValueError, match="training.max_length: 24 leaves no room for a prompt before "
                                         "grpo.max_completion_length 24"):
        grpo.build(_recipe("grpo", tiny_model, [path], tmp_path / "b", sections=section,
                           per_device_train_batch_size=4, max_length=24))


def test_vllm_gets_token_prompts_and_stops_at_the_end_of_turn(tmp_path, tiny_model, monkeypatch):
    """vLLM (faked: it is not installed here) is given the chat template's tokens without added special
    tokens (text would get a second bos from vLLM's tokenizer under a Llama-3-style template), the
    end-of-turn token as a stop token, and neutral penalties."""
    from alignment_trainer.model import load_tokenizer
    from alignment_trainer.stages import generate

    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen["llm"] = kwargs

        def generate(self, prompts, params):
            seen["prompts"] = prompts
            out = types.SimpleNamespace(text="Hi.", token_ids=[1, 2], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out] * params.n) for _ in prompts]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            seen["params"] = kwargs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    recipe = _recipe("generate", tiny_model, [str(tmp_path / "prompts.jsonl")], tmp_path / "g",
                     sections={"generate": {"num_generations": 2, "max_completion_length": 8}})
    tokenizer = load_tokenizer(recipe.model)
    tokenizer.chat_template = "{{ '<|endoftext|>' }}" + tokenizer.chat_template  # writes its own "bos"
    prompt = [{"role": "user", "content": "Tell me about cats."}]
    answers = generate.sample_vllm(recipe, tokenizer, [prompt])
    assert len(answers) == 2 and answers[0]["stopped"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert seen["prompts"] == [{"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}]
    assert seen["prompts"][0]["prompt_token_ids"].count(tokenizer.convert_tokens_to_ids("<|endoftext|>")) == 1
    assert seen["params"]["stop_token_ids"] == [tokenizer.eos_token_id]
    assert (seen["params"]["repetition_penalty"], seen["params"]["top_k"], seen["params"]["min_p"]) == (1.0, -1, 0.0)


def test_grpo_held_out_reward_samples_with_its_own_settings_not_the_checkpoints(tiny_model):
    """grpo's held-out reward samples at grpo.temperature as in training: a checkpoint whose
    generation_config carries a repetition_penalty (as Instruct models ship one) draws the same
    seeded samples as one without it."""
    from types import SimpleNamespace

    from alignment_trainer.model import load_model, load_tokenizer
    from alignment_trainer.recipe import ModelArgs
    from alignment_trainer.stages import grpo

    args = ModelArgs(model_name_or_path=tiny_model, torch_dtype="float32")
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}]} for i in range(3)]
    g = SimpleNamespace(max_completion_length=16, temperature=1.0, num_generations=2)
    length = lambda prompts, completions, **_: [float(len(c[0]["content"])) for c in completions]  # noqa: E731
    plain = grpo.held_out_reward(model, tokenizer, rows, [length], [1.0], g, seed=3)
    model.generation_config.repetition_penalty = 5.0
    with_penalty = grpo.held_out_reward(model, tokenizer, rows, [length], [1.0], g, seed=3)
    assert len(plain[1]) == 6 and any(s["completion"] for s in plain[1]), "it sampled something"
    assert [s["completion"] for s in with_penalty[1]] == [s["completion"] for s in plain[1]]
    assert model.generation_config.repetition_penalty == 5.0, "the checkpoint's config is restored"
