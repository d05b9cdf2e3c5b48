"""Shared pieces of the API models: camelCase, strictness, CRD-only schema hints."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema
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


def x_validations(*rules: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """`x-kubernetes-validations` CEL rules: (rule, message[, fieldPath]).

    The API server evaluates these at admission; `api.checks` holds the same rules in Python
    for `alignctl validate`, and tests/manifests/bad/ holds manifests both must refuse.
    Messages are static: a messageExpression's estimated cost (string building) counts
    against the CRD's CEL budget like a rule's does.
    """
    out = []
    for rule, message, *path in rules:
        item = {"rule": rule, "message": message}
        if path:
            item["fieldPath"] = path[0]
        out.append(item)
    return {"x-kubernetes-validations": out}


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
