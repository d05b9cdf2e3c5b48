"""Stages as a graph by what they read: a stage's inputs are the stages whose outputs its recipe
names (the model it starts from, `datasets[].stage`, `eval.reference`, reward models, an eval's
prompt sets). Every stage whose inputs succeeded may start; siblings run side by side.

Pure, no I/O. The inputs always come earlier in spec order (admission refuses a stage naming a
later one), so one pass in order sees every input's phase before its readers'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .render.recipe import start_stage

if TYPE_CHECKING:
    from .api import AlignmentRun


def inputs(run: "AlignmentRun", index: int) -> list[str]:
    """The names of the stages stage `index` reads, in spec order, each once."""
    stage = run.spec.stages[index]
    names: list[str] = []
    start = start_stage(run, index)
    if start is not None:
        names.append(start.name)
    names += [d.stage for d in (*stage.datasets, *stage.test_datasets) if d.stage]
    for section in (stage.grpo, stage.label, stage.eval):
        if section is not None:
            names += [r.reward_model for r in getattr(section, "rewards", []) if r.reward_model]
    e = stage.eval
    if e is not None:
        names += [n for n in (e.reference, e.reward_model) if n]
        sets = [e.prompts]
        if e.alpaca_eval is not None:
            sets += [e.alpaca_eval.reference_outputs, e.alpaca_eval.prompts]
        if e.mt_bench is not None:
            sets.append(e.mt_bench.questions)
        names += [d.stage for d in sets if d is not None and d.stage]
    order = [s.name for s in run.spec.stages]
    return sorted(set(names), key=order.index)


def dependants(run: "AlignmentRun", name: str) -> list[str]:
    """Every stage that reads `name`, directly or through others, in spec order."""
    hit = {name}
    out = []
    for i, s in enumerate(run.spec.stages):
        if s.name not in hit and hit & set(inputs(run, i)):
            hit.add(s.name)
            out.append(s.name)
    return out


def levels(run: "AlignmentRun") -> list[list[str]]:
    """The stages by how far they are from the start: stages of one level may run side by side."""
    depth: dict[str, int] = {}
    for i, s in enumerate(run.spec.stages):
        depth[s.name] = 1 + max((depth[n] for n in inputs(run, i)), default=-1)
    out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for name, d in depth.items():
        out[d].append(name)
    return out


def describe(run: "AlignmentRun") -> str:
    """`sft(sft) -> {dpo-0-01(dpo), dpo-0-1(dpo)} -> ...`: the graph in one line, by level."""
    method = {s.name: s.method for s in run.spec.stages}
    parts = [", ".join(f"{n}({method[n]})" for n in level) for level in levels(run)]
    return " -> ".join(p if "," not in p else "{" + p + "}" for p in parts)
