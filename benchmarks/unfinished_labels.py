"""Unfinished samples in an online round's labels (issue 24, item 4), on the tiny sums pipeline
(examples/online-tiny-run.yaml: sft -> generate-1 -> label-1, run in this process):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unfinished_labels.py [--workdir DIR] [--max-completion-length N ...]

For each max_completion_length, generate-1 samples 8 completions per training prompt from the SFT
model; label-1's pairwise feedback and a binary labelling (threshold 0.5) are made twice from the
same completions: as the label stage did before (generate's `stopped` flags ignored: every
completion may be chosen or desirable) and as it does now. Printed: how many completions did not
finish, how many chosen / desirable completions are unfinished each way, and the pairs and labels
written.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SUMS = REPO / "examples" / "data" / "sums"


def recipe_of(doc: dict, name: str, root: Path):
    from alignment_operator.api import AlignmentRun
    from alignment_operator.render.recipe import build_recipe

    run = AlignmentRun.model_validate(doc)
    return build_recipe(run, [s.name for s in run.spec.stages].index(name), str(root))


def feedback_counts(rows, scores, mode: str) -> dict:
    from alignment_trainer.stages import label

    # a completion by its prompt and text (prompts repeat in prompts.jsonl)
    original = {(json.dumps(r["prompt"]), c) for r in rows for c, s in zip(r["completions"], r["stopped"]) if s is False}
    if mode == "before":  # the flags unknown: every completion counts as finished, as before
        rows = [{**r, "stopped": [None] * len(r["completions"])} for r in rows]
    pairs, pair_counts = label.pairwise(rows, scores)
    chosen_unfinished = sum((json.dumps(p["prompt"]), p["chosen"][0]["content"]) in original for p in pairs)
    rejected_unfinished = sum((json.dumps(p["prompt"]), p["rejected"][0]["content"]) in original for p in pairs)
    labels, label_counts = label.binary(rows, scores, 0.5)
    desirable_unfinished = sum(r["label"] and (json.dumps(r["prompt"]), r["completion"][0]["content"]) in original
                               for r in labels)
    return {"pairs": pair_counts["pairs"], "chosen_unfinished": chosen_unfinished,
            "rejected_unfinished": rejected_unfinished, "unfinished_prompts": pair_counts.get("unfinished_prompts", 0),
            "desirable": label_counts["desirable"], "desirable_unfinished": desirable_unfinished,
            "unfinished_above_threshold": label_counts.get("unfinished_above_threshold", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--max-completion-length", type=int, nargs="+", default=[24, 16])
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="unfinished-"))

    from alignment_trainer import tiny
    from alignment_trainer.prompts import load_generations
    from alignment_trainer.rewards import build_rewards, reference_columns
    from alignment_trainer.stages import generate, label, sft

    model = work / "sums-model"
    if not model.exists():
        tiny.make_tiny_model(model, [SUMS / "sft.jsonl"], vocab_size=256)
    doc = yaml.safe_load((REPO / "examples" / "online-tiny-run.yaml").read_text())
    doc["spec"]["model"]["source"] = str(model)
    for stage in doc["spec"]["stages"]:
        for d in stage.get("datasets", []) + stage.get("testDatasets", []):
            if d.get("source"):
                d["source"] = str(REPO / d["source"])
    sft.run(recipe_of(doc, "sft", work))  # skipped when its final/ exists

    figures = {}
    lab = recipe_of(doc, "label-1", work)
    for length in args.max_completion_length:
        stage = next(s for s in doc["spec"]["stages"] if s["name"] == "generate-1")
        stage["generate"]["maxCompletionLength"] = length
        gen = recipe_of(doc, "generate-1", work)
        shutil.rmtree(gen.output_dir, ignore_errors=True)
        generated = generate.run(gen)
        columns = reference_columns(lab.label.rewards)
        rows = load_generations(lab, columns)
        funcs = build_rewards(lab, lab.label.rewards, section="label")
        scores, _ = label.score_rows(rows, funcs, [r.weight for r in lab.label.rewards], columns)
        figures[length] = {"completions": generated["completions"],
                           "unfinished": sum(s is False for r in rows for s in r["stopped"]),
                           "generation_stop_rate": generated["generation_stop_rate"],
                           **{mode: feedback_counts(rows, scores, mode) for mode in ("before", "after")}}
    print(json.dumps(figures, indent=1))
    for length, f in figures.items():
        print(f"max_completion_length {length}: {f['unfinished']}/{f['completions']} completions unfinished; "
              f"chosen unfinished {f['before']['chosen_unfinished']}/{f['before']['pairs']} pairs before, "
              f"{f['after']['chosen_unfinished']}/{f['after']['pairs']} after "
              f"({f['after']['unfinished_prompts']} prompts without a finished completion); desirable unfinished "
              f"{f['before']['desirable_unfinished']}/{f['before']['desirable']} before, "
              f"{f['after']['desirable_unfinished']}/{f['after']['desirable']} after")


if __name__ == "__main__":
    main()
