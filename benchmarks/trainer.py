"""Trainer throughput: two choices a recipe makes, each measured as a ratio in one run.

    .venv/bin/python benchmarks/trainer.py [--steps 24] [--hidden 256] [--keep DIR]

1. DPO step time with reference log-probs precomputed once (training.precompute_ref_log_probs)
   vs a live reference model forwarded every step: median seconds per optimizer step, from
   the per-step timestamps in metrics.jsonl (the precompute pass itself is timed apart).
2. SFT tokens per second with packing (training.packing: sequences packed into max_length
   rows, padding-free) vs padded batches, on chats whose lengths vary 20-fold: real
   (non-padding) tokens per second, from result.json.

Every run goes through the real stage entries (recipes -> alignment_trainer), on a random
model from alignment_trainer.tiny; on CPU, one thread per process (OMP_NUM_THREADS=1) unless set.
"""

from __future__ import annotations


import argparse
import sys
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer_image"))

import yaml  # noqa: E402

CLOCK, CLOCK_FIELD = time.time, "time"  # main() picks process CPU time on CPU

WORDS = ("the a river cat stone light bread music train star apple book rain garden clock ship bird coffee "
         "chess snow bridge kite map quiet bright old new small large warm cold runs sings reads builds").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_data(d: Path, rng: random.Random) -> dict[str, Path]:
    """Variable-length chats (answers of 4-80 words) and preference pairs of moderate length."""
    sft = [{"messages": [{"role": "user", "content": sentence(rng, rng.randint(3, 12))},
                         {"role": "assistant", "content": sentence(rng, int(4 * 20 ** rng.random()))}]}
           for _ in range(2000)]
    prefs = [{"prompt": [{"role": "user", "content": sentence(rng, rng.randint(8, 24))}],
              "chosen": [{"role": "assistant", "content": sentence(rng, rng.randint(16, 40))}],
              "rejected": [{"role": "assistant", "content": sentence(rng, rng.randint(16, 40))}]}
             for _ in range(512)]
    paths = {"sft": d / "sft.jsonl", "prefs": d / "prefs.jsonl"}
    for name, rows in (("sft", sft), ("prefs", prefs)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def stamp_cpu_time() -> None:
    """Add the process CPU time to every metrics.jsonl row. On a shared CPU box wall time also
    measures the neighbours; with one thread, CPU seconds measure only our work. (On GPU the
    wall clock is the right one: the CPU waits on the device.)"""
    from alignment_trainer import results

    on_log = results.MetricsCallback.on_log

    def with_cpu_time(self, args, state, control, logs=None, **kwargs):
        return on_log(self, args, state, control, logs={**(logs or {}), "cpu_time": time.process_time()}, **kwargs)

    results.MetricsCallback.on_log = with_cpu_time


def run_stage(d: Path, name: str, method: str, model: str, data: Path, **training) -> Path:
    """One stage through the real entry point (its progress lines go to <name>.log); returns its output dir."""
    from alignment_trainer.__main__ import run_recipe
    from alignment_trainer.recipe import Recipe

    out = d / name
    recipe = Recipe.model_validate({
        "method": method, "model": {"model_name_or_path": model, "torch_dtype": "float32"},
        "datasets": [{"path": str(data)}], "output_dir": str(out),
        "training": {"learning_rate": 1e-4, "logging_steps": 1, "save_steps": 10_000, "warmup_ratio": 0.0,
                     **training}})
    (d / f"{name}.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True)))
    started = CLOCK()
    with open(d / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
        run_recipe(recipe)
    (out / "setup_s").write_text(f"{CLOCK() - started - train_seconds(out):.3f}")
    return out


def step_times(out: Path) -> list[float]:
    """Seconds between consecutive logged optimizer steps (logging_steps=1), first two dropped as warm-up."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stamps = [r[CLOCK_FIELD] for r in rows if "loss" in r]
    return [b - a for a, b in zip(stamps, stamps[1:])][2:]


def train_seconds(out: Path) -> float:
    """First to last logged step, on the benchmark's clock."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stamps = [r[CLOCK_FIELD] for r in rows if "loss" in r]
    return stamps[-1] - stamps[0]


def tokens_per_second(out: Path) -> float:
    """Non-padding tokens of steps 2..N over the time they took (step 1 holds warm-up)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return (steps[-1]["num_input_tokens_seen"] - steps[0]["num_input_tokens_seen"]) / train_seconds(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per measured run")
    p.add_argument("--hidden", type=int, default=256, help="model width (4 layers)")
    p.add_argument("--keep", help="write everything here instead of a temporary directory")
    args = p.parse_args(argv)

    import torch

    from alignment_trainer.tiny import make_tiny_model

    global CLOCK, CLOCK_FIELD
    if torch.cuda.is_available():
        CLOCK, CLOCK_FIELD, clock = time.time, "time", "wall clock"
    else:
        CLOCK, CLOCK_FIELD, clock = time.process_time, "cpu_time", "process CPU time"
        stamp_cpu_time()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        data = write_data(d, random.Random(0))
        model = str(make_tiny_model(d / "model", [data["sft"], data["prefs"]], vocab_size=1024,
                                    hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4))
        device = "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} thread(s)"
        print(f"model: 4 layers, hidden {args.hidden}, on {device}; {args.steps} steps per run; timed by {clock}; "
              f"stage logs in {d}", flush=True)

        # 1. DPO: live reference vs precomputed reference log-probs
        dpo = dict(max_steps=args.steps, per_device_train_batch_size=8, max_length=128, beta=0.1)
        live = run_stage(d, "dpo_live", "dpo", model, data["prefs"], **dpo)
        pre = run_stage(d, "dpo_precomputed", "dpo", model, data["prefs"], precompute_ref_log_probs=True, **dpo)
        t_live, t_pre = statistics.median(step_times(live)), statistics.median(step_times(pre))
        # The one-off precompute pass is the difference in time spent outside the training steps.
        extra = float((pre / "setup_s").read_text()) - float((live / "setup_s").read_text())
        print(f"DPO step time: live reference {t_live * 1000:.0f} ms, precomputed reference log-probs "
              f"{t_pre * 1000:.0f} ms -> {t_live / t_pre:.2f}x faster per step "
              f"(the one-off precompute pass over 512 pairs: {extra:.1f} s)", flush=True)

        # 2. SFT: padded batches vs packing, real tokens per second
        sft = dict(max_steps=args.steps, per_device_train_batch_size=8, max_length=512)
        padded = run_stage(d, "sft_padded", "sft", model, data["sft"], **sft)
        packed = run_stage(d, "sft_packed", "sft", model, data["sft"], packing=True, **sft)
        tps = {name: tokens_per_second(out) for name, out in (("padded", padded), ("packed", packed))}
        print(f"SFT tokens/s (non-padding): padded {tps['padded']:,.0f}, packed {tps['packed']:,.0f} -> "
              f"{tps['packed'] / tps['padded']:.2f}x with packing", flush=True)
        # TRL packs best-fit-decreasing and trains padding-free: a batch is ONE flattened sequence.
        # flash_attention_2's varlen kernel attends within each packed chat; sdpa/eager build a dense
        # block mask over the whole flattened batch, so attention grows with its square.
        if not torch.cuda.is_available():
            print("  (packing trains padding-free; without flash_attention_2 attention is quadratic over the "
                  "whole flattened batch, so on CPU/sdpa packing is expected to lose)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
