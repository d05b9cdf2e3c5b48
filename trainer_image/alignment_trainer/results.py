"""What a stage leaves in its output directory, and how a rerun finds where it stopped.

    <output_dir>/
      checkpoint-N/      TRL's; complete once trainer_state.json is in it (written last)
      final/             model + tokenizer + generation_config + README.md (card.py); renamed into place whole
      metrics.jsonl      one JSON line per logging step (main process only)
      result.json        losses, reward metrics, runtime, tokens/s, global step, checkpoint path

Progress for people and parent processes: one JSON line per event on stdout, e.g.
    {"event": "progress", "step": 10, "total": 100, "epoch": 0.4, "loss": 1.93, ..., "eta_seconds": 312,
     "step_seconds": 3.467, "tokens_per_second": 2048.5}
events: start, progress, done, skipped. Everything else goes to stderr (logging).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from . import card, outcome, tracking
from .checkpoints import checkpoints
from .pace import Pace
from .recipe import Recipe

def emit(event: str, **fields) -> None:
    """One machine-readable line on stdout (the local runner parses these).

    Written with one write(2) of the whole line: ranks of one launch share the pipe, and under
    PYTHONUNBUFFERED print() issues the text and its newline as two writes, so two ranks' events
    could land as `{...}{...}\n\n`. A single write below PIPE_BUF (4096) is atomic on a pipe.
    """
    line = (json.dumps({"event": event, **fields}, default=_jsonable) + "\n").encode()
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured stdout (pytest, notebooks): no fd
        sys.stdout.write(line.decode())
        sys.stdout.flush()
        return
    while line:
        line = line[os.write(fd, line):]


def _jsonable(value):
    return value.item() if hasattr(value, "item") else str(value)


# ---------------------------------------------------------------------------- resume

def remove_incomplete_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete half-written checkpoints so checkpoint rotation never counts them (main process)."""
    removed = []
    for _, path, ok in checkpoints(output_dir):
        if not ok:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    for tmp in Path(output_dir).glob("final.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return removed


def finished_result(output_dir: str | Path) -> dict | None:
    """result.json of a stage that already completed (final/ present), else None."""
    result = Path(output_dir) / "result.json"
    if (Path(output_dir) / "final").is_dir() and result.is_file():
        return json.loads(result.read_text())
    return None


# ---------------------------------------------------------------------------- metrics

class MetricsCallback(TrainerCallback):
    """metrics.jsonl + a progress line per logging step, from the main process only. The line also
    carries the pace (pace.Pace: eta_seconds, step_seconds, tokens_per_second), which the local shell
    shows as it is."""

    def __init__(self, output_dir: str | Path, clock=None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.clock = clock  # live.CheckpointClock: the newest checkpoint and the work at risk, in each row
        self.pace: Pace | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.pace = Pace(state.global_step, state.num_input_tokens_seen or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "total": state.max_steps, "time": round(time.time(), 3),
               **{k: v for k, v in logs.items() if k != "total_flos"}, **(self.clock.fields() if self.clock else {})}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
        pace = {} if self.pace is None else {**self.pace.step(state.global_step, state.max_steps),
                                             **self.pace.tokens(state.num_input_tokens_seen)}
        emit("progress", **{**row, **pace})


class TaskProgress:
    """The progress lines of an evaluation task (`step` of `total` items done) with their pace
    (pace.Pace: eta_seconds, step_seconds), so the shells show the trainer's estimate for tasks too."""

    def __init__(self, task: str, total: int):
        self.task, self.total, self.pace = task, total, Pace()

    def __call__(self, step: int, total: int | None = None) -> None:
        total = self.total if total is None else total
        emit("progress", step=step, total=total, task=self.task, **self.pace.step(step, total))


# ---------------------------------------------------------------------------- final/

def save_final(trainer, recipe: Recipe, tokenizer, merge=None) -> Path:
    """Write final/ atomically: into final.tmp-<step>/, then one rename.

    Every process must call this (ZeRO-3 gathers the weights collectively); only the main one
    writes. merge(adapter_dir, out_dir), for LoRA with lora.merge, turns the saved adapter into a
    standalone model on the main process.
    """
    out = Path(recipe.output_dir)
    final = out / "final"
    tmp = out / f"final.tmp-{trainer.state.global_step}"
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    if merge is None:
        trainer.save_model(str(tmp))  # model (gathered 16-bit under ZeRO-3), tokenizer, generation_config
    else:
        trainer.save_model(str(tmp / "adapter"))
        if main:
            merge(str(tmp / "adapter"), str(tmp))
            shutil.rmtree(tmp / "adapter")
    if main:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)
        (tmp / "README.md").write_text(model_card(recipe, trainer))
        if final.exists():  # a previous final/ (rerun after deleting result.json): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final


def model_card(recipe: Recipe, trainer) -> str:
    """final/README.md: card.stage_card (base model and revision, datasets, every stage's recipe)."""
    return str(card.stage_card(recipe, trainer.state.global_step, tracking.links(trainer)))


# ---------------------------------------------------------------------------- result.json

def build_result(recipe: Recipe, trainer, train_metrics: dict, eval_metrics: dict | None, final: Path) -> dict:
    """The stage's outcome: what the operator copies into status and the eval stage reads."""
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    last = train_logs[-1] if train_logs else {}
    runtime = train_metrics.get("train_runtime")
    tokens_per_s = train_metrics.get("train_tokens_per_second") or next(
        (h["train_tokens_per_second"] for h in reversed(history) if "train_tokens_per_second" in h), None)
    tokens_per_s = tokens_per_s or None  # 0: the trainer could not count tokens (SimPO/ORPO batches)
    result = {
        "method": recipe.method,
        "stage": recipe.stage_name,
        "checkpoint": str(final),
        "global_step": trainer.state.global_step,
        "train_loss": train_metrics.get("train_loss", last.get("loss")),
        "train_loss_last": last.get("loss"),
        "eval_loss": (eval_metrics or {}).get("eval_loss"),
        "train_runtime_s": runtime,
        "train_tokens_per_second": tokens_per_s,
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen or None,
    }
    if recipe.info.preference:
        for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            source = eval_metrics if eval_metrics and f"eval_{key}" in eval_metrics else None
            result[f"eval_{key}" if source else key] = (
                source[f"eval_{key}"] if source else next((h[key] for h in reversed(train_logs) if key in h), None))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}


def write_result(recipe: Recipe, result: dict) -> None:
    """result.json (atomic) and the compact termination message (main process)."""
    out = Path(recipe.output_dir)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, out / "result.json")
    outcome.write(recipe.termination_message_path, result)


def write_data_stage(recipe: Recipe, rows: list[dict], result: dict) -> dict:
    """final/<METHODS[method].writes> and result.json, final/ renamed into place whole (a stage
    killed while writing leaves final.tmp-*, which the rerun removes, never a half dataset)."""
    out = Path(recipe.output_dir)
    tmp, final = out / f"final.tmp-{os.getpid()}", out / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / recipe.info.writes, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    result = {"method": recipe.method, "stage": recipe.stage_name, "checkpoint": str(final),
              "dataset": str(final / recipe.info.writes), **result}
    write_result(recipe, result)
    emit("done", **{k: v for k, v in result.items() if v is not None})
    return result


def push_to_hub(recipe: Recipe, final: Path, model_card=None) -> str | None:
    """Upload final/ when the recipe asks (card.push: HF_TOKEN required, never printed)."""
    if not recipe.push_to_hub:
        return None
    return card.push(recipe, final, model_card)
