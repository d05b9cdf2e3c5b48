"""The run's rules in Python, for `alignctl validate` and the operator: the rule table (api.rules), the
same one the CRD's CEL comes from, evaluated on the spec as the API server sees it (its wire form), plus the
checks that are no CEL rule of the CRD:

- two stages with one name: the API server refuses them through the stages list's map keys (name), a
  schema property, not a rule;
- api.admission.problems: the core/v1 shapes' rules (api.corev1.RULES, their own table), and what a
  stage's method makes of training.extraArgs (which TRL config the method builds: a CEL rule would hold
  every config's field list, past the CRD's cost budget).

Field-level checks (types, ranges, enums, unknown fields) come from pydantic and the schema;
tests/manifests/bad/ holds manifests the API server and these both refuse, in the same words.
"""

from __future__ import annotations

from . import admission
from .base import rule_problems
from .rules import names_rules, reward_rules, ship_rules, stage_rules, storage_rules, training_rules
from .spec import AlignmentRunSpec


def stage_problems(expanded: AlignmentRunSpec) -> list[str]:
    """On the expanded stages (each matrix variant with its own training; a stage may name a variant): each
    stage's, its training's and its rewards' rules, what the stages name, and admission.problems (core/v1
    shapes, extraArgs by method)."""
    wire = expanded.wire()
    names = [s["name"] for s in wire["stages"]]
    out = [f"spec.stages[{i}].name: {name!r} is already the name of stage {names.index(name)}; stage names must be "
           "unique" for i, name in enumerate(names) if name in names[:i]]
    for i, s in enumerate(wire["stages"]):
        at = f"spec.stages[{i}]"
        out += rule_problems(stage_rules(), s, at)
        out += rule_problems(training_rules(), s["training"], f"{at}.training")
        for section in ("grpo", "label", "eval"):
            for k, reward in enumerate((s.get(section) or {}).get("rewards", [])):
                out += rule_problems(reward_rules(), reward, f"{at}.{section}.rewards[{k}]")
    out += rule_problems(names_rules(), wire, "spec")
    return out + admission.problems(expanded)


def run_problems(spec: AlignmentRunSpec, local: bool = False) -> list[str]:
    """On the spec as written, as the API server sees it: what ships (hub, promote) and the storage. `local`:
    as `alignctl run --local` runs it (rules with local=False are not held there)."""
    wire = spec.wire()
    return rule_problems(ship_rules(), wire, "spec", local) + rule_problems(storage_rules(), wire["storage"],
                                                                           "spec.storage")
