"""The eval stage on the tiny model: preference accuracy against a reference, held-out loss and
perplexity, generations that stop at EOS, and the LLM-judge win rate against a local
OpenAI-compatible server (whose API key must never be written anywhere)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

API_KEY = "sk-test-0123456789abcdef"


def eval_recipe(kit, directory: Path, model: str, reference: str, datasets: list[str], **eval_args) -> str:
    return kit.write_recipe(directory, "eval", model, datasets,
                            training={"per_device_eval_batch_size": 8, "max_length": 64, "beta": 0.1},
                            eval={"reference_model": reference, "max_new_tokens": 24, "num_generations": 6,
                                  **eval_args})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_model_against_random_reference(tmp_path, sft_run, tiny_model, data_dir, kit):
    sft = str(Path(sft_run["output_dir"]) / "final")
    path = eval_recipe(kit, tmp_path, sft, tiny_model, [str(data_dir / "prefs_test.jsonl")])
    result = kit.run_in_process(path)
    out = tmp_path / "out"
    assert json.loads((out / "result.json").read_text()) == result
    assert result["checkpoint"] == sft and result["reference_model"] == tiny_model
    assert result["pairs"] == 32
    # Trained on such answers, the SFT model predicts held-out chosen replies far better than noise.
    assert result["eval_loss"] < result["reference_eval_loss"] - 1.0, result
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    for key in ("preference_accuracy", "logp_accuracy", "reference_logp_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["reward_margin"] == pytest.approx(result["reward_chosen"] - result["reward_rejected"])
    # Greedy generations for the held-out prompts, cut at the end-of-turn token.
    gens = read_jsonl(out / "generations.jsonl")
    assert len(gens) == 6 and all(g["prompt"][-1]["role"] == "user" for g in gens)
    assert result["generation_stop_rate"] >= 0.8, gens
    assert all("<|im_end|>" not in g["model"] for g in gens)
    assert all(g["model_tokens"] < 24 for g in gens if g["model_stopped"])


def test_model_against_itself_has_no_implicit_reward(tmp_path, sft_run, data_dir, kit):
    """reward = beta * (logp_model - logp_ref) is exactly 0 when both are one model."""
    sft = str(Path(sft_run["output_dir"]) / "final")
    path = eval_recipe(kit, tmp_path, sft, sft, [str(data_dir / "prefs_test.jsonl")], metrics=["preference", "loss"])
    result = kit.run_in_process(path)
    assert result["preference_accuracy"] == 0.0
    assert result["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert result["logp_accuracy"] == result["reference_logp_accuracy"]
    assert result["eval_loss"] == pytest.approx(result["reference_eval_loss"], rel=1e-5)
    assert not (tmp_path / "out" / "generations.jsonl").exists()


def test_preference_metrics_arithmetic():
    from alignment_trainer.stages.eval import preference_metrics

    # (chosen, rejected) interleaved, (sum logp, tokens): model vs reference.
    model = [(-2.0, 3), (-6.0, 3), (-5.0, 3), (-4.0, 3)]
    reference = [(-4.0, 3), (-5.0, 3), (-5.0, 3), (-5.0, 3)]
    m = preference_metrics(model, reference, beta=0.5)
    # rewards: pair 1 chosen +1.0, rejected -0.5 (won); pair 2 chosen 0.0, rejected +0.5 (lost)
    assert m["preference_accuracy"] == 0.5
    assert m["reward_margin"] == pytest.approx((1.5 + -0.5) / 2)
    assert m["logp_accuracy"] == 0.5 and m["reference_logp_accuracy"] == 0.5


def test_completion_mask_covers_only_the_answer(tiny_model):
    from alignment_trainer.model import load_tokenizer
    from alignment_trainer.recipe import ModelArgs
    from alignment_trainer.eval_rows import Encoder

    tok = load_tokenizer(ModelArgs(model_name_or_path=tiny_model))
    chat = [{"role": "user", "content": "Tell me about snow."}, {"role": "assistant", "content": "Snow is cold."},
            {"role": "user", "content": "And maps?"}, {"role": "assistant", "content": "Maps are flat."}]
    ids, mask = Encoder(tok, 256)(chat, scored_from=3)
    # a reply is scored through its end-of-turn token; ChatML's "\n" after it is template glue
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Maps are flat.<|im_end|>"
    ids, mask = Encoder(tok, 256)(chat, scored_from=0)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Snow is cold.<|im_end|>Maps are flat.<|im_end|>"
    # a prompt over max_prompt_length loses whole early turns, as training cuts it (training.truncate_prompt)
    ids, mask = Encoder(tok, 256, max_prompt_length=16)(chat, scored_from=3)
    assert tok.decode(ids[:mask.index(1)]) == "<|im_start|>user\nAnd maps?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Maps are flat.<|im_end|>"


# ---------------------------------------------------------------------------- LLM judge

def longer_answer_wins(body: dict) -> str:
    """Deterministic pairwise verdicts: the longer answer wins, equal lengths tie."""
    text = body["messages"][-1]["content"]
    a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End of Assistant A's Answer]")[0]
    b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End of Assistant B's Answer]")[0]
    verdict = "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"
    return f"Fine. {verdict}"


@pytest.fixture
def judge(fake_judge):
    return fake_judge(longer_answer_wins, api_key=API_KEY, path="/v1/chat/completions")


def test_judge_win_rate_both_orders_and_key_never_written(tmp_path, sft_run, tiny_model, data_dir, kit,
                                                          judge, monkeypatch, capfd):
    monkeypatch.setenv("JUDGE_API_KEY", API_KEY)
    sft = str(Path(sft_run["output_dir"]) / "final")
    path = eval_recipe(kit, tmp_path, sft, tiny_model, [str(data_dir / "prefs_test.jsonl")],
                       metrics=["judge"], judge={"base_url": judge.url, "model": "judge-1", "max_prompts": 5})
    result = kit.run_in_process(path)
    gens = read_jsonl(tmp_path / "out" / "generations.jsonl")
    judged = gens[:5]
    # Every prompt judged twice, the answers swapped; the server saw the model's answers in both slots.
    assert len(judge.requests) == 10 and result["judge_prompts"] == 5
    assert {r["model"] for r in judge.requests} == {"judge-1"}
    # A length-preferring judge is consistent across orders, so the win rate follows the lengths.
    expected = sum(1.0 if len(g["model"]) > len(g["reference"]) else 0.0 if len(g["model"]) < len(g["reference"])
                   else 0.5 for g in judged) / 5
    assert result["judge_win_rate"] == pytest.approx(expected)
    assert result["judge_consistency"] == 1.0 and result["judge_invalid"] == 0
    assert all(g["judge"]["score"] in (0.0, 0.5, 1.0) for g in judged)
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir() if p.is_file() and p.suffix != ".png")
    captured = capfd.readouterr()
    assert API_KEY not in written + captured.out + captured.err


def test_judge_rejects_a_wrong_key_without_echoing_it(judge, monkeypatch):
    from alignment_trainer.judge import Judge, JudgeError
    from alignment_trainer.judge_prompts import parse_verdict
    from alignment_trainer.recipe import JudgeArgs

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-wrong-key-42")
    client = Judge(JudgeArgs(base_url=judge.url, model="judge-1", api_key_env="MY_JUDGE_KEY"), retries=1)
    with pytest.raises(JudgeError, match="HTTP 401") as err:
        client.verdict("q", "a", "b")
    assert "sk-wrong-key-42" not in str(err.value)
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ValueError, match="MY_JUDGE_KEY"):
        Judge(JudgeArgs(base_url=judge.url, model="judge-1", api_key_env="MY_JUDGE_KEY"))
    assert [parse_verdict(t) for t in ("so [[A]]", "[[B]].", "[[C]]", "Verdict: tie", "B", "hmm")] == \
        ["A", "B", "tie", "tie", "B", None]
