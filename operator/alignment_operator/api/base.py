"""Shared pieces of the API models: camelCase, strictness, CRD-only schema hints."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel


# A field of a section the run shares with the recipe (alignment_trainer.recipe) is named in the run by its recipe
# name (TRL's, PEFT's) in camelCase, but where the run says it shorter: recipe name -> the run's.
API_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "num_train_epochs": "epochs",
             "lr_scheduler_type": "scheduler", "per_device_train_batch_size": "per_device_batch_size",
             "torch_dtype": "dtype", "attn_implementation": "attention"}


def api_alias(name: str) -> str:
    return to_camel(API_NAMES.get(name, name))


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


# Where a rule's Python test finds it broken, when it can say more than its message: (the path relative to
# the rule's object, what is wrong there in words: the value, what would be accepted).
Miss = tuple[str, str]


@dataclass(frozen=True)
class Rule:
    """One admission rule, stated once: the CEL `cel` with its `message` (the CRD's
    x-kubernetes-validations on the object it is attached to), `field` the path the message is about
    (relative, as CEL's fieldPath; "" the object itself), and `ok` the same test in Python on the same
    object as CEL sees it (camelCase keys, defaults filled in, `self` that object), which
    `alignctl validate` and the operator evaluate. `ok` returns whether the object passes, or, where
    Python can name more (the list item, the value, what is accepted), the places it fails (Miss).
    Messages are static: a messageExpression's estimated cost (string building) counts against the
    CRD's CEL budget like a rule's does."""

    cel: str
    message: str
    field: str
    ok: Callable[[Any], bool | list[Miss]]
    show: bool = True    # False: never echo the value (it may be a credential)
    local: bool = True   # False: `alignctl run --local` does not hold it (spec.hub's token comes from the login)

    def item(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, **({"fieldPath": self.field} if self.field else {})}

    def misses(self, obj: Any) -> list[Miss]:
        """Where `obj` breaks the rule: (relative path, words), none when it passes."""
        found = self.ok(obj)
        if isinstance(found, list):
            return found
        if found:
            return []
        shown: Any = obj
        for key in self.field.lstrip(".").split(".") if self.field else []:
            shown = shown[key] if isinstance(shown, dict) and key in shown else dict
        got = f" (got {shown!r})" if self.show and self.field and not isinstance(shown, (type, dict, list)) else ""
        return [(self.field, f"{self.message}{got}")]

    def problems(self, obj: Any, at: str) -> list[str]:
        """'path: what is wrong' lines for `obj` (at `at`), none when it passes."""
        return [f"{at}{path}: {words}" for path, words in self.misses(obj)]


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
