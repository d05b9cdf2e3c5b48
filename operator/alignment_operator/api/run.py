"""The AlignmentRun resource and the one entry point that reads it: `parse_run`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .base import Rule
from .checks import run_problems, stage_problems
from .matrix import expand
from .corev1 import FORMATS
from .spec import DNS_LABEL, AlignmentRunSpec
from .status import AlignmentRunStatus

GROUP = "alignment.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AlignmentRun"
PLURAL = "alignmentruns"
SINGULAR = "alignmentrun"
SHORT_NAMES = ["ar", "arun"]
# Set to any new value to retry the run's failed stages once (each resumes from its newest
# checkpoint; succeeded stages are never redone). `alignctl run --local` asks the same of the
# local shell by running again. status.retryRequest records the value acted upon.
RETRY_ANNOTATION = f"{GROUP}/retry"


# A run's name names its Jobs and is the value of their alignment.dev/run label: a DNS label, which the API
# server's own check of a custom resource's name (a DNS subdomain: dots, 253 characters) is not.
RUN_NAME_MESSAGE = ("must be a DNS label: at most 63 lowercase letters, digits or '-', starting and ending with a "
                    "letter or digit (it names the run's Jobs and labels)")


def _run_name_ok(run: dict) -> bool:
    name = (run.get("metadata") or {}).get("name")
    return name is None or len(name) <= 63 and re.match(DNS_LABEL, name) is not None


RUN_NAME_RULE = Rule(f"!has(self.metadata.name) || (size(self.metadata.name) <= 63 && "
                     f"self.metadata.name.matches('{DNS_LABEL}'))", f"metadata.name {RUN_NAME_MESSAGE}", ".metadata.name",
                     _run_name_ok)


class ObjectMeta(BaseModel):
    """The few metadata fields we read; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    namespace: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not RUN_NAME_RULE.ok({"metadata": {"name": value}}):
            raise ValueError(RUN_NAME_MESSAGE)
        return value


class AlignmentRun(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["alignment.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["AlignmentRun"] = KIND
    metadata: ObjectMeta
    spec: AlignmentRunSpec
    status: AlignmentRunStatus | None = None
    # Stages expanded from a matrix or an eval of several stages: name -> matrix.Variant (parse_run fills it).
    _expansion: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def expansion(self) -> dict[str, Any]:
        return self._expansion


class RunInvalid(ValueError):
    """A run that can never work; `problems` are 'field.path: what is wrong' lines."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        head = f"{source}: " if source else ""
        super().__init__(head + "invalid AlignmentRun:\n  " + "\n  ".join(problems))


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "function-plain") or "[" in str(part):
            continue  # pydantic's internal validator steps, not fields
        else:
            out += ("." if out else "") + str(part)
    return out


def _describe(err: dict[str, Any]) -> str:
    path = _path(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown field (check the spelling; `kubectl explain alignmentrun.spec` lists the fields)"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") in FORMATS:
        return f"{path}: {shown} is not {FORMATS[err['ctx']['pattern']]}"
    return f"{path}: {err['msg']} (got {shown})"


def parse_run(data: Any, source: str = "", local: bool = False) -> AlignmentRun:
    """Validate a manifest as the API server and the operator would; RunInvalid names each field. `local`:
    as `alignctl run --local` runs it, where spec.hub needs no trainer.hfTokenSecretRef (the trainer takes
    HF_TOKEN or the Hugging Face login, as huggingface_hub does)."""
    if not isinstance(data, dict):
        raise RunInvalid([f"expected a mapping, got {type(data).__name__}"], source)
    try:
        run = AlignmentRun.model_validate(data, context={"local": local})
    except ValidationError as e:
        raise RunInvalid([_describe(err) for err in e.errors()], source) from None
    expanded, variants, problems, where = expand(run.spec)
    if problems:
        raise RunInvalid(problems, source)
    # A stage's index in the file, and which of its variants (entries) it is about.
    problems = [_original_index(p, expanded, where, variants) for p in stage_problems(expanded)]
    problems += run_problems(run.spec, local)
    if problems:
        raise RunInvalid(problems, source)
    if variants:
        run.spec = expanded
        run._expansion = variants
    return run


def _original_index(problem: str, expanded: AlignmentRunSpec, where: list[int], variants: dict) -> str:
    def at(m: re.Match) -> str:
        k = int(m.group(1))
        name = expanded.stages[k].name
        return f"spec.stages[{where[k]}]" + (f" (its variant {name})" if name in variants else "")
    return re.sub(r"spec\.stages\[(\d+)\]", at, problem)
