"""The trainer's floor plan, enforced: alignment_trainer/stages/ holds the stage entries only (one module
per METHODS[method].entry), no entry imports another, and nothing outside stages/ imports an entry
(__main__ dispatches to them by name). What entries share (rewards, prompts, sampling, judge prompts,
the reward-model scorer, the training steps) is a module of the package beside data.py and model.py."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from alignment_trainer.recipe import METHODS

TRAINER = Path(__file__).resolve().parents[2] / "trainer_image" / "alignment_trainer"
ENTRIES = {info.entry for info in METHODS.values()}


def stage_imports(path: Path, in_stages: bool) -> set[str]:
    """The modules under alignment_trainer.stages a file imports, lazily or not, by any spelling."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            elif node.level == 1:  # the file's own package
                base = ".".join(filter(None, ["alignment_trainer.stages" if in_stages else "alignment_trainer",
                                              node.module]))
            else:  # `from ..x` inside stages/ reaches the package, never a stage
                base = ".".join(filter(None, ["alignment_trainer", node.module])) if in_stages else ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n.split(".")[2] for n in names
                  if n.startswith("alignment_trainer.stages.") and n.split(".")[2] in ENTRIES}
    return found


def floor_plan_violations(root: Path) -> list[str]:
    found = []
    stages = root / "stages"
    modules = {p.stem for p in stages.glob("*.py") if p.stem != "__init__"}
    for extra in sorted(modules - ENTRIES):
        found.append(f"stages/{extra}.py is not a stage entry (METHODS[...].entry): move it beside data.py")
    for path in sorted(root.rglob("*.py")):
        in_stages = path.parent == stages
        rel = path.relative_to(root).as_posix()
        for target in sorted(stage_imports(path, in_stages) - {path.stem if in_stages else ""}):
            found.append(f"{rel} imports the stage entry {target}" if in_stages else
                         f"{rel} imports the stage entry {target}: entries sit on top, nothing imports them")
    return found


def test_stages_holds_entries_that_import_no_other_entry():
    assert {p.stem for p in (TRAINER / "stages").glob("*.py")} - {"__init__"} == ENTRIES
    assert floor_plan_violations(TRAINER) == []


def test_the_check_fails_on_an_entry_importing_an_entry_and_a_library_in_stages(tmp_path):
    """The same check on a copy of the trainer with the imports issue 29 removed put back."""
    copy = tmp_path / "alignment_trainer"
    shutil.copytree(TRAINER, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "stages" / "label.py").open("a") as f:
        f.write("\nfrom .generate import write_data_stage  # deliberate\n")
    with (copy / "stages" / "eval.py").open("a") as f:
        f.write("\n\ndef f():\n    from .grpo import build  # deliberate, lazy\n")
    with (copy / "rewards.py").open("a") as f:
        f.write("\nfrom alignment_trainer.stages import eval as eval_stage  # deliberate\n")
    (copy / "stages" / "rewards.py").write_text("")
    assert floor_plan_violations(copy) == [
        "stages/rewards.py is not a stage entry (METHODS[...].entry): move it beside data.py",
        "rewards.py imports the stage entry eval: entries sit on top, nothing imports them",
        "stages/eval.py imports the stage entry grpo",
        "stages/label.py imports the stage entry generate",
    ]
