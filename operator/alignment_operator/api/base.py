"""Shared pieces of the API models: camelCase, strictness, CRD-only schema hints. A `Rule` (the CEL rule, its
message and field, and the same test in Python) and the run's names of the recipe's fields (API_NAMES) are the
trainer's contract's (alignment_trainer.rules), where a recipe holds the same rules of a stage."""

from __future__ import annotations

import re
from typing import Annotated, Any

from alignment_trainer.rules import API_NAMES, Miss, Rule, api_alias  # noqa: F401  (the stage's rules' own; re-exported)
from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema, model_validator


class ApiModel(BaseModel):
    """Every API object: camelCase on the wire (API_NAMES where it differs), unknown fields refused."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=api_alias,
        populate_by_name=True,
        use_attribute_docstrings=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _first(rules: list[Rule], obj: dict) -> None:
    for rule in rules:
        for _, words in rule.misses(obj):
            raise ValueError(words)


def holds(*rules: Rule) -> tuple[Any, Any]:
    """A model's two validators holding it to `rules` (of that one object) as it is read: pydantic names the
    model's path, the refusal is the first broken rule's words. Rules that never show their value (a URL that
    may hold credentials) are held before the fields are checked, on the mapping as given, so that no field's
    own refusal echoes the value first; the rest on the model as the API server sees it (wire)."""
    early, late = [r for r in rules if not r.show], [r for r in rules if r.show]

    def before(cls: type, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            _first(early, {(fields[k].alias or k) if k in fields else k: v for k, v in data.items()})
        return data

    def after(self: "ApiModel") -> "ApiModel":
        _first(late, self.wire())
        return self
    return model_validator(mode="before")(classmethod(before)), model_validator(mode="after")(after)


def x_validations(*rules: Rule | tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """`x-kubernetes-validations` CEL rules: Rules, or (rule, message[, fieldPath]) whose Python twin is
    elsewhere (a pydantic validator beside the model)."""
    out = []
    for rule in rules:
        if isinstance(rule, Rule):
            out.append(rule.item())
            continue
        cel, message, *path = rule
        out.append({"rule": cel, "message": message, **({"fieldPath": path[0]} if path else {})})
    return {"x-kubernetes-validations": out}


def rule_problems(rules: list[Rule], obj: Any, at: str, local: bool = False) -> list[str]:
    """Every rule of a table on one object."""
    return [p for r in rules if r.local or not local for p in r.problems(obj, at)]


# A Kubernetes resource quantity ("8", "64Gi", "500m"), as int or string on the wire: the grammar
# of k8s.io/apimachinery/pkg/api/resource (ParseQuantity), and above zero (a zero or negative
# request, limit or size is refused when the pod or volume is created, or never schedules).
_QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
QUANTITY_MESSAGE = "must be a positive Kubernetes quantity like 8, '500m', '64Gi' or '1.5e3'"


def _check_quantity(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(QUANTITY_MESSAGE)
    if isinstance(v, str):
        match = _QUANTITY.match(v)
        if not match or float(match.group(1)) == 0 or v.startswith("-"):
            raise ValueError(QUANTITY_MESSAGE)
    elif v <= 0:
        raise ValueError(QUANTITY_MESSAGE)
    return v


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "maxLength": 64,  # bounds the rule's estimated cost
                    **x_validations((
                        "type(self) == int ? self > 0 : "
                        "(isQuantity(self) && quantity(self).isGreaterThan(quantity('0')))",
                        "must be a positive Kubernetes quantity like 8, 500m, 64Gi or 1.5e3"))}),
]

# Free-form Kubernetes objects we pass through to pods (tolerations, affinity, envFrom ...).
# The API server validates them where they land (the Job); here they are kept as-is.
KubeObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
