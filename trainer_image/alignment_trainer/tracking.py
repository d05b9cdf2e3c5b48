"""Experiment tracking the way TRL users already log: transformers' own TensorBoard, W&B and
MLflow callbacks (TrainingArguments.report_to), configured from recipe.tracking.

    config_fields(recipe)   -> report_to and run_name for the TRL config (and the trackers' env)
    TrackedRun()            a callback that learns where each tracker put the run
    links(trainer)          {"tensorboard": dir, "wandb": url or offline dir, "mlflow": run url}

One tracked run per stage, named <run>/<stage>. A restarted pod continues the same run: W&B by a
run id derived from the stage's output directory (WANDB_RESUME=allow), MLflow by finding the run
tagged with that directory in the experiment; TensorBoard appends event files to the same
directory. Steps are the optimizer's global steps, so a resumed curve joins where it stopped.
Credentials are read from the environment by the trackers themselves and never logged here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from transformers import TrainerCallback

from .recipe import Recipe

log = logging.getLogger(__name__)
STAGE_TAG = "alignment.dev/output-dir"


def tracked_run_name(recipe: Recipe) -> str:
    if recipe.tracking.tracked_run_name:
        return recipe.tracking.tracked_run_name
    if recipe.run_name and recipe.stage_name:
        return f"{recipe.run_name}/{recipe.stage_name}"
    return recipe.run_name or recipe.stage_name or Path(recipe.output_dir).name


def tensorboard_dir(recipe: Recipe) -> str:
    return recipe.tracking.tensorboard_dir or str(Path(recipe.output_dir) / "tensorboard")


def wandb_run_id(recipe: Recipe) -> str:
    """Stable per stage (its output directory), so a restarted pod resumes the same W&B run."""
    slug = re.sub(r"[^a-z0-9-]+", "-", tracked_run_name(recipe).lower()).strip("-")[:40]
    return f"{slug}-{hashlib.sha256(str(Path(recipe.output_dir).resolve()).encode()).hexdigest()[:8]}"


def config_fields(recipe: Recipe) -> dict:
    """report_to and run_name for the TRL config; sets the trackers' environment (no credentials)."""
    t = recipe.tracking
    name = tracked_run_name(recipe)
    if "tensorboard" in t.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = tensorboard_dir(recipe)
    if "wandb" in t.report_to:
        os.environ.update(WANDB_PROJECT=t.wandb_project, WANDB_MODE=t.wandb_mode, WANDB_DIR=recipe.output_dir,
                          WANDB_RUN_ID=wandb_run_id(recipe), WANDB_RESUME="allow", WANDB_NAME=name)
        os.environ.setdefault("WANDB_LOG_MODEL", "false")  # final/ is on the volume; no upload of weights
        os.environ.setdefault("WANDB_WATCH", "false")
        if t.wandb_entity:
            os.environ["WANDB_ENTITY"] = t.wandb_entity
        if t.wandb_base_url:
            os.environ["WANDB_BASE_URL"] = t.wandb_base_url
    if "mlflow" in t.report_to:
        os.environ.update(MLFLOW_TRACKING_URI=t.mlflow_tracking_uri,
                          MLFLOW_EXPERIMENT_NAME=t.mlflow_experiment or recipe.run_name or name,
                          MLFLOW_TAGS=json.dumps({STAGE_TAG: str(Path(recipe.output_dir).resolve()),
                                                  "alignment.dev/run": recipe.run_name or "",
                                                  "alignment.dev/stage": recipe.stage_name or "",
                                                  "alignment.dev/method": recipe.method}))
        resumed = _mlflow_run_to_resume(recipe) if int(os.environ.get("RANK", "0")) == 0 else None
        if resumed:
            os.environ["MLFLOW_RUN_ID"] = resumed
    return {"report_to": list(t.report_to) or "none", "run_name": name}


def _mlflow_run_to_resume(recipe: Recipe) -> str | None:
    """The MLflow run an earlier attempt of this stage started (tagged with its output dir), if any."""
    if not any(Path(recipe.output_dir).glob("checkpoint-*")):
        return None  # nothing to resume from: a fresh run
    import mlflow

    mlflow.set_tracking_uri(recipe.tracking.mlflow_tracking_uri)
    experiment = mlflow.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    if experiment is None:
        return None
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list", max_results=1,
                              filter_string=f"tags.`{STAGE_TAG}` = '{Path(recipe.output_dir).resolve()}'",
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


class TrackedRun(TrainerCallback):
    """Records, once the trackers have started their run, where it lives (for result.json, the
    model card and the run's status). Added after transformers' own tracker callbacks."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.links: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        t = self.recipe.tracking
        if "tensorboard" in t.report_to:
            self.links["tensorboard"] = tensorboard_dir(self.recipe)
        if "wandb" in t.report_to:
            import wandb

            run = wandb.run
            if run is not None:
                self.links["wandb"] = run.dir.rsplit("/files", 1)[0] if t.wandb_mode == "offline" else run.url
        if "mlflow" in t.report_to:
            import mlflow

            run = mlflow.active_run()
            if run is not None:
                uri = t.mlflow_tracking_uri.rstrip("/")
                base = uri if uri.startswith(("http://", "https://")) else ""
                self.links["mlflow"] = (f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                                        if base else f"{uri} run {run.info.run_id}")
                self.links["mlflow_run_id"] = run.info.run_id

    def on_train_end(self, args, state, control, **kwargs):
        """transformers' MLflowCallback ends its run here; the stage's final evaluation comes after
        and would land in a new, unnamed run: reopen the stage's run for it."""
        run_id = self.links.get("mlflow_run_id")
        if run_id and state.is_world_process_zero:
            import mlflow

            if mlflow.active_run() is None:
                mlflow.start_run(run_id=run_id)


def links(trainer) -> dict[str, str]:
    """What TrackedRun recorded for this trainer ({} when nothing is tracked)."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TrackedRun):
            return dict(cb.links)
    return {}
