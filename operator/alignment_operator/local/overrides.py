"""`--set path=value`: a value of the run file changed on the command line, then validated with
the whole run exactly as the file is (the same messages: the field, the bad value, what is accepted).

    --set stages.dpo.training.beta=0.05          a stage by name (or stages[1])
    --set spec.model.dtype=bfloat16              `spec.` is optional
    --set 'stages.sft.datasets[0].weight=0.5'
    --set stages.eval.eval.metrics='[preference, loss]'

Keys are the file's (camelCase); the value is read as YAML (0.05 a number, true a bool, [a, b] a
list, 'text' a string).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..api import RunInvalid

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class OverrideError(RunInvalid):
    """An override that names no place in the run, or is not `path=value`."""


_PATH = re.compile(r"^[^.\[\]=]+(\[\d+\])*(\.[^.\[\]=]+(\[\d+\])*)*$")


def _steps(path: str, source: str) -> list[str | int]:
    if not _PATH.match(path):
        raise OverrideError([f"--set {source}: {path!r} is not a field path (e.g. stages.dpo.training.beta "
                             "or spec.stages[1].training.beta)"])
    steps: list[str | int] = [m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _PART.finditer(path)]
    return steps if steps[0] == "spec" else ["spec", *steps]


def apply_override(doc: dict, override: str) -> str:
    """Set one `path=value` in the run document (in place); the path as the run's field path."""
    path, sep, text = override.partition("=")
    if not sep or not path.strip():
        raise OverrideError([f"--set {override!r}: expected path=value, e.g. stages.dpo.training.beta=0.05"])
    steps = _steps(path.strip(), override)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise OverrideError([f"--set {override}: the value {text!r} is not YAML ({e.__class__.__name__})"]) from None
    node: Any = doc
    shown = ""
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if shown.endswith("stages") and isinstance(step, str) and isinstance(node, list):
            names = [s.get("name") for s in node if isinstance(s, dict)]
            if step not in names:
                raise OverrideError([f"--set {override}: {shown}: no stage named {step!r}; the stages: "
                                     f"{', '.join(map(str, names))}"])
            step = names.index(step)
        if isinstance(step, int):
            if not isinstance(node, list) or not 0 <= step < len(node) + (1 if last else 0):
                size = len(node) if isinstance(node, list) else 0
                raise OverrideError([f"--set {override}: {shown}[{step}]: out of range ({shown} has {size} item(s))"])
            shown += f"[{step}]"
            if last:
                node[step:step + 1] = [value]
            else:
                node = node[step]
            continue
        if not isinstance(node, dict):
            raise OverrideError([f"--set {override}: {shown} is {type(node).__name__}, not a mapping with fields"])
        shown += ("." if shown else "") + step
        if last:
            node[step] = value
        else:
            node = node.setdefault(step, [] if step in ("stages", "datasets", "testDatasets") else {})
    return shown


def apply_overrides(doc: dict, overrides: list[str]) -> list[str]:
    """Every override in order; the field paths they set (for the console)."""
    return [f"{apply_override(doc, o)}={o.partition('=')[2]}" for o in overrides]
