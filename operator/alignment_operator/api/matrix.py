"""Sweeps: a stage's `matrix` expands into one stage per combination of its values, and an eval
stage that evaluates several stages (a matrix's variants, or eval.stages) into one entry per
evaluated stage. Done once, when the run is read (parse_run), so the operator, `alignctl validate`
and `run --local` all see the same expanded stages; the names are a pure function of the values,
so a run read again (or a value added to the matrix) keeps its variants' names.

The API server refuses what it can check (the rule table's CEL on spec.stages[].matrix, evaluated here
too: the variant limit, a field the method does not read, a loss the method lacks); what it cannot (the names the values make, a
collision with another stage, the stages that read a matrix stage) is refused here, naming the field.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from alignment_trainer.recipe import METHODS

from .base import rule_problems
from .rules import matrix_rules, matrix_size_rules
from .spec import AlignmentRunSpec, StageSpec, TrainingSpec

MAX_STAGES = 64      # stages after expansion, at most
NAME_LIMIT = 40      # a stage name's length (StageSpec.name)


@dataclass(frozen=True)
class Variant:
    """What an expanded stage is: `of` the spec's stage it came from; `values` its matrix values (camelCase
    field -> value); for an eval entry, `evaluates` the stage it evaluates."""

    of: str
    values: dict[str, Any] = field(default_factory=dict)
    evaluates: str | None = None


def _slug(value: Any) -> str:
    text = str(value).lower() if not isinstance(value, bool) else ("true" if value else "false")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "x"


def _short(base: str, parts: list[str]) -> str:
    """<base>-<parts>, or <base>-<hash of the parts> when that is longer than a stage name may be."""
    name = "-".join([base, *parts])
    if len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]
    return f"{base[:NAME_LIMIT - 9].rstrip('-')}-{digest}"


def combinations(stage: StageSpec) -> list[dict[str, Any]]:
    """The matrix's combinations (camelCase field -> value), in the order its fields and values are given."""
    m = stage.matrix
    if m is None:
        return []
    given = [(TrainingSpec.model_fields[n].alias, v) for n, v in m if v is not None]
    return [dict(zip([a for a, _ in given], combo)) for combo in itertools.product(*(v for _, v in given))]


def variant_name(stage: str, values: dict[str, Any]) -> str:
    return _short(stage, [_slug(v) for v in values.values()])


def _matrix_problems(i: int, stage: StageSpec, taken: set[str]) -> list[str]:
    at = f"spec.stages[{i}].matrix"
    if stage.matrix is None:
        return []
    # The API server's rules (rules.matrix_rules) first, on the stage as written.
    wire = stage.wire()
    out = rule_problems(matrix_rules(), wire, f"spec.stages[{i}]")
    if not METHODS[stage.method].trains:
        return out
    for name, values in stage.matrix:
        if values is not None and len(set(map(repr, values))) < len(values):
            out.append(f"{at}.{TrainingSpec.model_fields[name].alias}: {values} repeats a value (its variants would "
                       "be the same stage)")
    too_many = rule_problems(matrix_size_rules(list(wire["matrix"])), wire["matrix"], at)
    if too_many:
        return out + too_many
    combos = combinations(stage)
    names = [variant_name(stage.name, c) for c in combos]
    for values, name in zip(combos, names):
        if name in taken:
            out.append(f"{at}: variant {values} is named {name!r}, already the name of another stage; "
                       "rename that stage or this one")
    if len(set(names)) < len(names):
        out.append(f"{at}: two variants get one name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                   "give values that differ after lowercasing and replacing other characters by '-'")
    for values in combos:  # each variant's training must be valid as a stage's (maxPromptLength < maxLength, ...)
        t = {**stage.training.model_dump(by_alias=True, exclude_unset=True), **values}
        try:
            trained = TrainingSpec.model_validate(t)
        except Exception as e:  # noqa: BLE001  (pydantic's ValidationError: its first line names the field)
            out.append(f"{at}: variant {values}: {str(e).splitlines()[1:3]}")
            continue
        if trained.max_prompt_length is not None and trained.max_prompt_length >= trained.max_length:
            out.append(f"{at}: variant {values}: maxPromptLength {trained.max_prompt_length} must be below "
                       f"maxLength {trained.max_length}")
    return out


def _start_name(spec: AlignmentRunSpec, i: int) -> str | None:
    start = spec.start_stage(i)
    return start.name if start is not None else None


def _evaluated(spec: AlignmentRunSpec, i: int, variants: dict[str, list[str]]) -> list[str] | None:
    """The stages eval stage `i` evaluates when several (None: one, as any stage)."""
    stage = spec.stages[i]
    if stage.method != "eval":
        return None
    if stage.eval is not None and stage.eval.stages:
        named = stage.eval.stages
    else:
        start = spec.start_stage(i)
        if start is None or start.name not in variants:
            return None
        named = [start.name]
    out: list[str] = []
    for n in named:
        out += variants.get(n, [n])
    return list(dict.fromkeys(out)) if len(out) > 1 or any(n in variants for n in named) else None


def _reads_matrix(spec: AlignmentRunSpec, i: int, variants: dict[str, list[str]]) -> list[str]:
    """A stage other than an eval of several that reads a matrix stage: which variant does it mean?"""
    stage = spec.stages[i]
    at = f"spec.stages[{i}]"
    out = []

    def name(field: str, value: str | None) -> None:
        if value in variants:
            out.append(f"{at}.{field}: {value!r} is a matrix stage of {len(variants[value])} variants; name one of "
                       f"them ({', '.join(variants[value])}), or evaluate them all with an eval stage")

    if stage.method != "eval":
        if stage.from_ is not None:
            name("from", stage.from_)
        else:
            start = spec.start_stage(i)
            if start is not None and start.name in variants:
                out.append(f"{at}.from: unset, so the stage would start from the previous one, {start.name!r}, a "
                           f"matrix stage of {len(variants[start.name])} variants; set from (e.g. to the stage the "
                           f"matrix starts from, or one variant: {variants[start.name][0]})")
    for k, d in enumerate(stage.datasets):
        name(f"datasets[{k}].stage", d.stage)
    if stage.eval is not None:
        name("eval.reference", stage.eval.reference)
        name("eval.rewardModel", stage.eval.reward_model)
    for section in ("grpo", "label", "eval"):
        for k, r in enumerate(getattr(getattr(stage, section), "rewards", None) or []):
            name(f"{section}.rewards[{k}].rewardModel", r.reward_model)
    return out


def expand(spec: AlignmentRunSpec) -> tuple[AlignmentRunSpec, dict[str, Variant], list[str], list[int]]:
    """(the expanded spec, name -> Variant for each expanded stage, problems, the spec index each expanded
    stage came from). Nothing to expand: the spec itself."""
    if not any(s.matrix is not None or (s.eval is not None and s.eval.stages) for s in spec.stages):
        return spec, {}, [], list(range(len(spec.stages)))
    problems: list[str] = []
    names = {s.name for s in spec.stages}
    variants: dict[str, list[str]] = {}
    for i, s in enumerate(spec.stages):
        found = _matrix_problems(i, s, names - {s.name})
        problems += found
        if s.matrix is not None and not found:
            variants[s.name] = [variant_name(s.name, c) for c in combinations(s)]
    if problems:
        return spec, {}, problems, []
    out: list[StageSpec] = []
    where: list[int] = []
    info: dict[str, Variant] = {}
    for i, s in enumerate(spec.stages):
        problems += _reads_matrix(spec, i, variants)
        if s.matrix is not None:
            # Each variant starts where the matrix stage would (not from its sibling before it).
            start = s.from_ or _start_name(spec, i)
            for values, vname in zip(combinations(s), variants[s.name]):
                training = TrainingSpec.model_validate(
                    {**s.training.model_dump(by_alias=True, exclude_unset=True), **values})
                out.append(s.model_copy(update={"name": vname, "matrix": None, "training": training, "from_": start}))
                where.append(i)
                info[vname] = Variant(s.name, values)
            continue
        evaluated = _evaluated(spec, i, variants)
        if evaluated is None:
            if s.eval is not None and s.eval.stages:  # one stage named: it is the eval's from
                out.append(s.model_copy(update={"from_": s.eval.stages[0],
                                                "eval": s.eval.model_copy(update={"stages": []})}))
            else:
                out.append(s)
            where.append(i)
            continue
        for k, name in enumerate(evaluated):
            if name not in names and name not in info:
                problems.append(f"spec.stages[{i}].eval.stages: {name!r} is not an earlier stage; accepted: "
                                f"{', '.join([n for n in (s2.name for s2 in out)]) or 'none'}")
                continue
            ename = _short(s.name, [name])
            if ename in names and ename != s.name:
                problems.append(f"spec.stages[{i}].eval.stages: its entry for {name!r} is named {ename!r}, already "
                                "the name of another stage; rename one of them")
            out.append(s.model_copy(update={"name": ename, "from_": name,
                                            "eval": (s.eval.model_copy(update={"stages": []}) if s.eval else None)}))
            where.append(i)
            info[ename] = Variant(s.name, evaluates=name)
    if len(out) > MAX_STAGES:
        problems.append(f"spec.stages: the matrices expand the run into {len(out)} stages, more than {MAX_STAGES}")
    expanded = spec.model_copy(update={"stages": out})
    problems += [re.sub(r"spec\.stages\[(\d+)\]", lambda m: f"spec.stages[{where[int(m.group(1))]}]", p)
                 for p in _same_reference(expanded, info)]  # the index in the file
    return expanded, info, problems, where


def _same_reference(spec: AlignmentRunSpec, info: dict[str, Variant]) -> list[str]:
    """An eval of several stages compares them against one reference: unless eval.reference names it, the
    evaluated stages must start from the same model."""
    index = {s.name: k for k, s in enumerate(spec.stages)}
    groups: dict[str, set[str]] = {}
    for s in spec.stages:
        v = info.get(s.name)
        if v is None or v.evaluates is None or (s.eval is not None and s.eval.reference) or v.evaluates not in index:
            continue
        start = spec.start_stage(index[v.evaluates])
        groups.setdefault(v.of, set()).add(start.name if start else "spec.model")
    return [f"spec.stages[{next(k for k, s in enumerate(spec.stages) if info.get(s.name) and info[s.name].of == of)}]"
            f".eval.reference: the stages {of} evaluates start from different models ({', '.join(sorted(starts))}); "
            "name the reference they are all compared against"
            for of, starts in groups.items() if len(starts) > 1]
