"""Which stages a local run runs again: `--from STAGE`, `--redo STAGE`, and the refusal of an edit
to a stage that already succeeded (on a cluster: the SpecRejected condition; here exit 2 with the
command that applies the edit).

A stage "reads" another when its rendered recipe names that stage's directory (its final model,
the dataset a data stage wrote, a reward model, an eval reference): what it reads is what it was
made from, so redoing a stage redoes every stage that read it, transitively.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..api import AlignmentRun, AlignmentRunStatus, StageStatus
from ..identity import stage_hash
from ..render.recipe import build_recipe, stage_dir


class PlanError(Exception):
    """A request that cannot be carried out as asked (exit 2): the message says what to do."""


def readers(run: AlignmentRun, root: str) -> dict[str, set[str]]:
    """stage name -> the later stages whose recipes read its directory."""
    texts = [build_recipe(run, i, root).dump() for i in range(len(run.spec.stages))]
    out: dict[str, set[str]] = {s.name: set() for s in run.spec.stages}
    for i, s in enumerate(run.spec.stages):
        mark = stage_dir(root, run, s.name) + "/"
        out[s.name] = {run.spec.stages[j].name for j in range(i + 1, len(texts)) if mark in texts[j]}
    return out


def _names(run: AlignmentRun, asked: list[str], flag: str) -> None:
    names = [s.name for s in run.spec.stages]
    for name in asked:
        if name not in names:
            raise PlanError(f"{flag} {name}: no such stage; the stages: {', '.join(names)}")


def to_redo(run: AlignmentRun, root: str, redo: list[str], from_stage: str | None) -> list[str]:
    """The stages to run again from scratch, in run order: --from's and every later one; --redo's and,
    transitively, every stage that read them."""
    names = [s.name for s in run.spec.stages]
    _names(run, redo, "--redo")
    _names(run, [from_stage] if from_stage else [], "--from")
    chosen = set(redo) | (set(names[names.index(from_stage):]) if from_stage else set())
    reads = readers(run, root)
    for name in names:  # run order: a reader comes after what it reads
        if name in chosen:
            chosen |= reads[name]
    return [n for n in names if n in chosen]


def _flat(d, at: str = "") -> dict[str, object]:
    if isinstance(d, dict):
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{at}.{k}" if at else str(k)))
        return out
    return {at: d}


def recipe_changes(old_recipe: Path, new_text: str) -> list[str]:
    """`field: old -> new` for each recipe value an edit changed (the recipe the stage ran with is in
    its directory); [] when that recipe is not there to compare."""
    try:
        old = _flat(yaml.safe_load(old_recipe.read_text()) or {})
    except (OSError, yaml.YAMLError):
        return []
    new = _flat(yaml.safe_load(new_text) or {})
    skip = ("termination_message_path",)
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not k.endswith(skip) and not k.startswith("gpu_seconds")]


def edited_finished(run: AlignmentRun, status: AlignmentRunStatus | None, root: str, redo: list[str],
                    command: str) -> None:
    """PlanError when a stage that succeeded was edited since (and is not being redone)."""
    for i, st in enumerate(status.stages if status else []):
        if i >= len(run.spec.stages) or st.name != run.spec.stages[i].name:
            break
        if st.phase != "Succeeded" or not st.spec_hash or st.spec_hash == stage_hash(run, i) or st.name in redo:
            continue
        out = Path(stage_dir(root, run, st.name))
        changes = recipe_changes(out / "recipe.yaml", build_recipe(run, i, root).dump())
        also = sorted(readers(run, root)[st.name])
        raise PlanError(
            f"stage {st.name} already succeeded, and its spec changed since"
            + (f" ({'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''})" if changes else "")
            + f". The edit is not applied to what it trained. To train it again with the edit: {command} "
            f"--redo {st.name}" + (f" (also redoes {', '.join(also)}, which read it)" if also else "")
            + "; or revert the edit to keep what it made")


def reset(run: AlignmentRun, status: AlignmentRunStatus | None, root: str, names: list[str]) -> list[str]:
    """Forget the stages' results and remove their directories (checkpoints, final/, logs): they run
    from scratch. The directories it removed."""
    removed = []
    for name in names:
        out = Path(stage_dir(root, run, name))
        if out.exists():
            shutil.rmtree(out)
            removed.append(str(out))
        if status is None:
            continue
        status.stages = [StageStatus(name=name) if s.name == name else s for s in status.stages]
        if status.evaluation.get("stage") == name:
            status.evaluation = {}
    return removed
