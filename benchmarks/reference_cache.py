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

    .venv/bin/python benchmarks/reference_cache.py --zero3 [--rows 64] [--hidden 64]

--zero3: one dpo stage on 2 processes under DeepSpeed ZeRO-3 (CPU: gloo), the reference being the
policy (precomputed log-probs), run three times on one cache, its outputs deleted before each:
  1. the cache is empty: computed, step-0 loss ln 2 (policy = reference);
  2. the same stage again: reused (the speed-up above, kept under ZeRO-3);
  3. other weights written over the reference's model.safetensors (same path, config, tokenizer):
     computed, step-0 loss ln 2 (keyed by the gathered weights; TRL's hash of ZeRO-3's empty
     placeholders reused run 1's log-probs at 73214b4: 'reused', step-0 loss 0.7480).
Printed per run: computed/reused, the step-0 loss, the trainer build time and, of it, the key's
hashing (the weights gathered and hashed); then the ratio of run 1's trainer build to run 2's.
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


def zero3(work: Path, model: Path, prefs: Path) -> int:
    """The --zero3 runs (module docstring); 0 when they compute, reuse and recompute as they should."""
    import math
    import shutil
    import subprocess

    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    from alignment_trainer.launch import build_launch_command, launch_env

    reference, cache = work / "reference", work / "cache" / "reference-logps"
    shutil.copytree(model, reference)
    cpu = not torch.cuda.is_available()

    def run() -> dict:
        out = work / "dpo-zero3"
        shutil.rmtree(out, ignore_errors=True)  # a rerun after the outputs were deleted
        out.mkdir()
        recipe = {"method": "dpo", "stage_name": "dpo", "model": {"model_name_or_path": str(reference),
                                                                   "torch_dtype": "float32"},
                  "datasets": [{"path": str(prefs)}], "output_dir": str(out / "out"), "cache_dir": str(cache),
                  "training": {"max_steps": 1, "learning_rate": 1e-4, "per_device_train_batch_size": 4,
                               "max_length": 64, "logging_steps": 1, "save_steps": 100,
                               "gradient_checkpointing": False, "precompute_ref_log_probs": True}}
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        env = {**os.environ, **launch_env(cpu=cpu), "PYTHONPATH": str(ROOT / "trainer_image"),
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        start = time.perf_counter()
        proc = subprocess.run(build_launch_command(str(out / "recipe.yaml"), "deepspeed-zero3", 2, cpu=cpu),
                              env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the stage failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads((out / "out" / "result.json").read_text())
        rows = [json.loads(line) for line in (out / "out" / "metrics.jsonl").read_text().splitlines()]
        return {"reference_logps": result["reference_logps"], "step0_loss": round(next(r["loss"] for r in rows
                                                                                       if "loss" in r), 4),
                "trainer_build_s": result["reference_pass_s"], "hash_s": result.get("reference_hash_s"),
                "stage_wall_s": round(time.perf_counter() - start, 2)}

    runs = {"1 empty cache": run(), "2 same stage again": run()}
    weights = reference / "model.safetensors"
    noise = torch.Generator().manual_seed(1)
    save_file({k: t + 0.05 * torch.randn(t.shape, generator=noise) for k, t in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    runs["3 reference replaced in place"] = run()
    for name, r in runs.items():
        print(f"{name:32s} {r['reference_logps']:9s} step-0 loss {r['step0_loss']:.4f}   trainer build "
              f"{r['trainer_build_s']:6.2f} s (key hashing {r['hash_s']} s)   stage {r['stage_wall_s']:7.2f} s")
    first, second = runs["1 empty cache"], runs["2 same stage again"]
    ratio = round(first["trainer_build_s"] / second["trainer_build_s"], 2)
    print(f"run 1 / run 2: trainer build {ratio}x (ZeRO-3, 2 processes, {'CPU' if cpu else 'GPU'})")
    print(json.dumps({**runs, "ratio_trainer_build": ratio}))
    ln2 = round(math.log(2), 4)
    expected = [("computed", ln2), ("reused", ln2), ("computed", ln2)]
    return 0 if [(r["reference_logps"], r["step0_loss"]) for r in runs.values()] == expected else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="preference pairs (examples/data/prefs.jsonl, repeated)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random model")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per preference stage")
    parser.add_argument("--keep", help="work in this directory and keep it")
    parser.add_argument("--zero3", action="store_true", help="the ZeRO-3 runs (module docstring) instead")
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
    if args.zero3:
        return zero3(work, model, prefs)
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
