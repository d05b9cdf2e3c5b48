"""Sample completions from a stage's model: the first half of an online round (generate -> label -> train).

    python -m alignment_trainer recipe.yaml          # recipe.method: generate

recipe.model is the policy (by default the final/ of the run's previous model-making stage);
recipe.datasets hold prompts, read as grpo reads them (a `prompt` string or turns, or `messages`
whose trailing assistant turn is dropped); every other column (a reference `answer`, ids) is kept
as it is, for the label stage's rules. recipe.generate.num_generations completions are sampled per
prompt (transformers' generate, seeded, stopping at the end-of-turn token; vLLM with
generate.use_vllm where it is installed and a GPU is present) and written, one row per prompt, to

    <output_dir>/final/generations.jsonl   {"prompt": [turns], "completions": [text, ...],
                                            "stopped": [bool, ...], <the prompt row's other columns>}

which a later stage reads by naming this stage (datasets[].stage), as HALOs' label step reads the
samples its vLLM step wrote. result.json: prompts, completions, the fraction that stopped before
max_completion_length and the mean completion length. Sampling uses exactly generate.temperature and
top_p (no top-k, no repetition penalty): the checkpoint's generation_config settings are not applied
and result.json lists them as generation_config_ignored. Several processes (a GPU node's default: one
per GPU) split the prompts, each sampling its share on its own device; the first writes the dataset
(with vLLM one process samples). A rerun of a stage whose final/ and result.json exist does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from ..data import DataError, describe
from ..model import load_model, load_tokenizer
from ..prompts import load_prompt_rows
from ..recipe import Recipe
from ..results import emit, write_data_stage
from ..sampling import generate as sample
from ..sampling import ignored_generation_settings
from ..training import setup_stage, stage_label, truncate_prompt

log = logging.getLogger("alignment_trainer")

def check_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("generate.use_vllm: vllm is not installed in this image; set it false (transformers "
                         "generates) or use a GPU trainer image with vllm")
    if not torch.cuda.is_available():
        raise ValueError("generate.use_vllm: vLLM needs a GPU and this stage has none; set it false or give the "
                         "stage GPUs (resources.gpusPerNode)")


def vllm_requests(tokenizer, prompts: list[list[dict]]) -> list[dict]:
    """The prompts as vLLM token prompts: the chat template's text tokenized without special tokens
    (as sample_share does). Given the text, vLLM would tokenize it adding the tokenizer's bos, and a
    template that writes the bos itself (Llama 3's) would start with two."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]


def vllm_sampling(recipe: Recipe, tokenizer) -> dict:
    """SamplingParams for vLLM: the recipe's settings and nothing else (neutral repetition penalty, no
    top-k or min-p, whatever the checkpoint's generation_config says), stopping at the end-of-turn
    token (model.load_tokenizer's eos, which the checkpoint's own tokenizer files may not name)."""
    g = recipe.generate
    return dict(n=g.num_generations, temperature=g.temperature, top_p=g.top_p, top_k=-1, min_p=0.0,
                repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                max_tokens=g.max_completion_length, seed=recipe.training.seed,
                stop_token_ids=[tokenizer.eos_token_id])


def sample_vllm(recipe: Recipe, tokenizer, prompts: list[list[dict]]) -> list[dict]:
    """vLLM's offline LLM.generate: n samples per prompt (its own batching), in prompt order."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=recipe.model.model_name_or_path, revision=recipe.model.model_revision,
              dtype=recipe.model.torch_dtype,
              trust_remote_code=recipe.model.trust_remote_code, seed=recipe.training.seed)
    params = SamplingParams(**vllm_sampling(recipe, tokenizer))
    answers = []
    for request in llm.generate(vllm_requests(tokenizer, prompts), params):
        answers += [{"text": o.text.strip(), "tokens": len(o.token_ids), "stopped": o.finish_reason == "stop"}
                    for o in request.outputs]
    return answers


def sample_share(recipe: Recipe, tokenizer, prompts: list[list[dict]], rank: int, world: int,
                 device) -> tuple[list[dict], dict]:
    """This process's prompts (every world-th from rank), sampled with transformers on `device`; and
    the checkpoint's generation settings it did not sample with (sampling.ignored_generation_settings)."""
    from transformers import set_seed

    g = recipe.generate
    set_seed(recipe.training.seed + rank)
    model = load_model(recipe.model, tokenizer).to(device).eval()
    answers = sample(model, tokenizer, prompts[rank::world], g.max_completion_length, g.batch_size, "generate",
                     do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=0,
                     num_return_sequences=g.num_generations)
    return answers, ignored_generation_settings(model)


def gather_shares(out: Path, answers: list[dict], rank: int, world: int) -> list[dict] | None:
    """Every process's answers, back in prompt order, on the first process (None on the others)."""
    from accelerate import PartialState

    state = PartialState()
    out.mkdir(parents=True, exist_ok=True)
    part = out / f"generations.part-{rank}.json"
    part.write_text(json.dumps(answers))
    state.wait_for_everyone()
    if rank != 0:
        return None
    shares = [json.loads((out / f"generations.part-{r}.json").read_text()) for r in range(world)]
    for r in range(world):
        (out / f"generations.part-{r}.json").unlink()
    return shares


def run(recipe: Recipe) -> dict | None:
    done = setup_stage(recipe)
    if done is not None:
        return done
    g = recipe.generate
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if g.use_vllm and rank != 0:  # vLLM batches on its own: one process samples
        return None

    # Prompts first: a bad or empty dataset fails in seconds, before a model loads.
    rows = load_prompt_rows(recipe)
    if not rows:
        raise DataError(f"{stage_label(recipe)}: no prompts in {', '.join(describe(d) for d in recipe.datasets)}; "
                        "a generate stage needs at least one row with a `prompt` (text or turns) or `messages`: "
                        "fix datasets[] (the file, its split, weight or generate.maxPrompts)")
    if g.use_vllm:
        check_vllm()

    # Model & tokenizer: the policy as it is, frozen
    tokenizer = load_tokenizer(recipe.model)
    prompts = [r["prompt"] for r in rows]
    if recipe.training.max_prompt_length:  # cut long prompts keeping their end, as the training stages do
        prompts = [truncate_prompt(p, tokenizer, recipe.training.max_prompt_length) for p in prompts]
    start = time.perf_counter()
    if rank == 0:
        emit("start", method=recipe.method, stage=recipe.stage_name, prompts=len(rows), samples=g.num_generations,
             processes=1 if g.use_vllm else world)
    n = g.num_generations
    ignored: dict = {}
    if g.use_vllm:
        answers = sample_vllm(recipe, tokenizer, prompts)
        per_prompt = [answers[i * n:(i + 1) * n] for i in range(len(rows))]
    elif world == 1:
        answers, ignored = sample_share(recipe, tokenizer, prompts, 0, 1,
                                        "cuda" if torch.cuda.is_available() else "cpu")
        per_prompt = [answers[i * n:(i + 1) * n] for i in range(len(rows))]
    else:
        from accelerate import PartialState

        mine, ignored = sample_share(recipe, tokenizer, prompts, rank, world, PartialState().device)
        shares = gather_shares(Path(recipe.output_dir), mine, rank, world)
        if shares is None:
            return None
        # Prompt i was rank i % world's (i // world)-th: its n answers sit at that offset of the share.
        per_prompt = [shares[i % world][(i // world) * n:(i // world + 1) * n] for i in range(len(rows))]
        answers = [a for group in per_prompt for a in group]

    # One row per prompt: its completions in sampling order
    out = []
    for row, mine in zip(rows, per_prompt):
        out.append({**row, "completions": [a["text"] for a in mine], "stopped": [a["stopped"] for a in mine]})
    return write_data_stage(recipe, out, {
        "prompts": len(rows), "completions": len(answers),
        "generation_stop_rate": sum(a["stopped"] for a in answers) / len(answers),
        "mean_completion_tokens": sum(a["tokens"] for a in answers) / len(answers),
        "generate_runtime_s": round(time.perf_counter() - start, 3),
        # the checkpoint's generation_config settings not sampled with: exactly generate.* is
        "generation_config_ignored": ignored or None,
    })
