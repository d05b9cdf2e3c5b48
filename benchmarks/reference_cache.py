"""Reference log-probs cached across stages: a second preference stage skips the reference pass.

    .venv/bin/python benchmarks/reference_cache.py [--rows 400] [--hidden 256] [--keep DIR]

One run, three preference stages after one SFT stage, all from the SFT model (the reference)
with precompute_ref_log_probs and one shared cache directory (a rendered run's
<volume>/cache/reference-logps/):
  1. cdpo (eps 0.1) on the pairs: the cache is empty, the reference pass runs;
  2. dpo (sigmoid, another beta, another output dir) on the same pairs, template and lengths:
     the log-probs are read back, no reference forward runs;
  3. as 2 with another chat template: the key differs, the pass runs again.
Printed per stage: whether the log-probs were computed or reused, the time to build the trainer
(tokenizing, hashing the reference weights, and the pass when it runs) and the stage's wall time;
then the ratios of stage 1 to stage 2. Every stage goes through the real stage entries on a random
model from alignment_trainer.tiny; on CPU, one thread (OMP_NUM_THREADS=1) unless set.
"""

from __future__ import annotations


import argparse
import sys
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer_image"))

OTHER_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}")


def stage(work: Path, name: str, method: str, model: str, data: str, cache: Path | None = None,
          chat_template: str | None = None, **training) -> tuple[dict, float]:
    from alignment_trainer.__main__ import run_recipe
    from alignment_trainer.recipe import Recipe

    recipe = Recipe.model_validate({
        "method": method, "stage_name": name,
        "model": {"model_name_or_path": model, "torch_dtype": "float32", "chat_template": chat_template},
        "datasets": [{"path": data}], "output_dir": str(work / name),
        "cache_dir": str(cache) if cache else None,
        "training": {"per_device_train_batch_size": 16, "max_length": 128, "max_prompt_length": 64,
                     "gradient_checkpointing": False, "logging_steps": 5, "save_steps": 1000, **training}})
    start = time.perf_counter()
    result = run_recipe(recipe)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="preference pairs (examples/data/prefs.jsonl, repeated)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random model")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per preference stage")
    parser.add_argument("--keep", help="work in this directory and keep it")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from alignment_trainer.tiny import make_tiny_model

    work = Path(args.keep or tempfile.mkdtemp(prefix="refcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = ROOT / "examples" / "data"
    rows = (data / "prefs.jsonl").read_text().splitlines()
    prefs = work / "prefs.jsonl"
    prefs.write_text("\n".join((rows * (args.rows // len(rows) + 1))[:args.rows]) + "\n")
    model = make_tiny_model(work / "base", sorted(data.glob("*.jsonl")), hidden_size=args.hidden)
    sft, _ = stage(work, "sft", "sft", str(model), str(data / "sft.jsonl"), max_steps=10, learning_rate=2e-3)
    sft_model = sft["checkpoint"]
    cache = work / "cache" / "reference-logps"
    common = dict(max_steps=args.steps, learning_rate=5e-4, precompute_ref_log_probs=True)
    runs = {
        "1 cdpo, empty cache": stage(work, "cdpo", "dpo", sft_model, str(prefs), cache, loss_type="cdpo",
                                     label_smoothing=0.1, **common),
        "2 dpo, same reference/data/template": stage(work, "dpo", "dpo", sft_model, str(prefs), cache, beta=0.3,
                                                     **common),
        "3 dpo, another chat template": stage(work, "dpo-template", "dpo", sft_model, str(prefs), cache,
                                              chat_template=OTHER_TEMPLATE, **common),
    }
    report = {}
    for name, (result, wall) in runs.items():
        report[name] = {"reference_logps": result["reference_logps"], "trainer_build_s": result["reference_pass_s"],
                        "stage_wall_s": round(wall, 2)}
        print(f"{name:40s} {result['reference_logps']:9s} trainer build {result['reference_pass_s']:7.2f} s   "
              f"stage {wall:7.2f} s")
    (first, w1), (second, w2) = runs["1 cdpo, empty cache"], runs["2 dpo, same reference/data/template"]
    report["ratio_trainer_build"] = round(first["reference_pass_s"] / second["reference_pass_s"], 2)
    report["ratio_stage_wall"] = round(w1 / w2, 2)
    report["pairs"], report["hidden"] = args.rows, args.hidden
    print(f"stage 1 / stage 2: trainer build {report['ratio_trainer_build']}x, stage wall {report['ratio_stage_wall']}x "
          f"({args.rows} pairs, train + no test split, hidden {args.hidden})")
    print(json.dumps(report))
    ok = (runs["2 dpo, same reference/data/template"][0]["reference_logps"] == "reused"
          and runs["3 dpo, another chat template"][0]["reference_logps"] == "computed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
