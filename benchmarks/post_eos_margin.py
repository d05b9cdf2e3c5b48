"""What the template's glue after the end-of-turn token did to DPO (issue 24, item 2), on the tiny
ChatML pipeline (examples/tiny-run.yaml: SFT -> DPO -> eval, run in this process):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/post_eos_margin.py [--workdir DIR] [--loss-types sigmoid cdpo ...]

DPO is trained twice from the same SFT model: once scoring TRL's completions as TRL 1.16 cuts them
from the rendered conversation ("... <|im_end|>\\n": `trl`), once through the end-of-turn token
(tokens.CompletionEndsAtEndOfTurn: `end_of_turn`). For each it prints
- the share of the held-out reward margin carried by tokens after the end-of-turn token, on the
  tokens the DPO trainer scores (its prepared eval split; policy = the trained model, reference =
  the SFT model, beta as trained);
- the DPO run's last held-out reward margin (TRL's eval_rewards/margins, final evaluate()) and the
  eval stage's reward_margin on the same pairs, and their difference.
The eval batch size is 20, a divisor of the 60 held-out pairs: TRL averages per-batch means, so a
ragged last batch would weigh its pairs differently from the eval stage's mean over pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


def run_doc(model: Path) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "tiny-run.yaml").read_text())
    doc["spec"]["model"]["source"] = str(model)
    for stage in doc["spec"]["stages"]:
        for d in stage.get("datasets", []) + stage.get("testDatasets", []):
            d["source"] = str(REPO / d["source"])
        if stage["method"] == "eval":
            stage["eval"] = {"metrics": ["preference"]}
    return doc


def recipe_of(doc: dict, name: str, root: Path):
    from alignment_operator.api import AlignmentRun
    from alignment_operator.render.recipe import build_recipe

    run = AlignmentRun.model_validate(doc)
    index = [s.name for s in run.spec.stages].index(name)
    recipe = build_recipe(run, index, str(root))
    recipe.training.per_device_eval_batch_size = 20
    return recipe


@torch.no_grad()
def post_eos_share(trainer, reference_path: str, beta: float, max_length: int) -> dict:
    """Of the held-out reward margin on the trainer's own tokens: the part after the end-of-turn token."""
    from transformers import AutoModelForCausalLM

    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32).eval()
    eos = trainer.processing_class.eos_token_id

    def token_logps(model, prompt, completion):
        ids = (prompt + completion)[:max_length]
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        return lp[len(prompt) - 1:].tolist()  # the completion's tokens (those kept by max_length)

    total = after = 0.0
    glue_tokens = 0
    for row in trainer.eval_dataset:
        parts = {}
        for key, sign in (("chosen_ids", 1), ("rejected_ids", -1)):
            completion = row[key]
            ratio = [p - r for p, r in zip(token_logps(policy, row["prompt_ids"], completion),
                                           token_logps(reference, row["prompt_ids"], completion))]
            end = completion.index(eos) + 1 if eos in completion else len(completion)
            parts[key] = (sign * beta * sum(ratio), sign * beta * sum(ratio[end:]))
            glue_tokens += len(ratio[end:])
        total += sum(t for t, _ in parts.values())
        after += sum(a for _, a in parts.values())
    n = len(trainer.eval_dataset)
    return {"held_out_pairs": n, "margin": total / n, "post_eos_margin": after / n,
            "post_eos_share": after / total, "post_eos_tokens": glue_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--loss-types", nargs="+", default=["sigmoid"],
                        help="the dpo stage's lossType, each trained both ways (cdpo with labelSmoothing 0.1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="post-eos-"))

    from alignment_trainer import losses, tiny, training
    from alignment_trainer.stages import dpo, eval as eval_stage, sft

    model = work / "tiny-model"
    if not model.exists():
        tiny.make_tiny_model(model, sorted(DATA.glob("*.jsonl")))
    doc = run_doc(model)
    base = work / "trl"
    sft.run(recipe_of(doc, "sft", base))  # skipped when its final/ exists

    figures = {}
    ways = (("trl", losses.DPOTrainer), ("end_of_turn", dpo.DPOTrainer))
    for loss_type, (way, trainer_cls) in ((loss, w) for loss in args.loss_types for w in ways):
        section = next(st for st in doc["spec"]["stages"] if st["name"] == "dpo")["training"]
        section.pop("labelSmoothing", None)
        section.update(lossType=loss_type, **({"labelSmoothing": 0.1} if loss_type == "cdpo" else {}))
        root = work / (way if loss_type == "sigmoid" else f"{loss_type}-{way}")
        if root != base and not (root / "default" / "tiny" / "sft").exists():
            shutil.copytree(base / "default" / "tiny" / "sft", root / "default" / "tiny" / "sft")
        recipe = recipe_of(doc, "dpo", root)
        shutil.rmtree(recipe.output_dir, ignore_errors=True)
        saved, dpo.DPOTrainer = dpo.DPOTrainer, trainer_cls  # dpo.trainer_classes picks it up
        try:
            training.setup_stage(recipe)
            trainer, tokenizer = dpo.build(recipe)
            output = training.train(trainer, recipe)
            result = training.finish_stage(trainer, recipe, tokenizer, output)
        finally:
            dpo.DPOTrainer = saved
        share = post_eos_share(trainer, recipe.ref_model, recipe.training.beta, recipe.training.max_length)
        ev_recipe = recipe_of(doc, "eval", root)
        shutil.rmtree(ev_recipe.output_dir, ignore_errors=True)
        ev = eval_stage.run(ev_recipe)
        figures[f"{loss_type}/{way}"] = {**share, "dpo_eval_rewards/margins": result["eval_rewards/margins"],
                        "eval_stage_reward_margin": ev["reward_margin"],
                        "eval_stage_minus_dpo": ev["reward_margin"] - result["eval_rewards/margins"],
                        "eval_stage_preference_accuracy": ev["preference_accuracy"],
                        "eval_stage_logp_accuracy": ev["logp_accuracy"],
                        "eval_stage_reference_logp_accuracy": ev["reference_logp_accuracy"],
                        "dpo_eval_rewards/accuracies": result.get("eval_rewards/accuracies")}
        del trainer
    print(json.dumps(figures, indent=1))
    for loss_type in args.loss_types:
        before, after = figures[f"{loss_type}/trl"], figures[f"{loss_type}/end_of_turn"]
        print(f"{loss_type}: post-EOS share of the held-out margin: trl {before['post_eos_share']:.1%}, "
              f"end_of_turn {after['post_eos_share']:.1%}; |eval stage - DPO held-out margin| "
              f"trl {abs(before['eval_stage_minus_dpo']):.4f}, end_of_turn {abs(after['eval_stage_minus_dpo']):.2e}")


if __name__ == "__main__":
    main()
