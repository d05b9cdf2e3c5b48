"""What the API server or the kubelet would refuse only when a stage's pods are created,
refused at admission instead: each check one Rule (api.base), the CEL rule in the CRD and the same
test in Python (`alignctl validate`, via checks.py), with the same message.

- storage.mountPath: absolute, clean, not over the recipe mount, /dev/shm or the termination log;
- trainer.image: a well-formed image reference (distribution/reference's grammar);
- trainer.nodeSelector: label keys and values;
- training.extraArgs: TRL config fields of the stage's method (trl_fields.json, generated from the
  installed TRL by tools/gen_trl_fields.py), not the ones the trainer sets or has typed fields for.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import WithJsonSchema

from alignment_trainer.recipe import TrainingArgs

from . import corev1
from .base import Rule, api_alias, rule_problems

# The pod's own mounts besides the run's volume (render.manifests mounts exactly these, the progress token
# when the operator serves progress), and the trainer image's accelerate configs (RenderContext's default
# accelerate_config_dir, the chart's trainer.accelerateConfigDir), which the volume must not hide.
RESERVED_MOUNTS = {"/etc/alignment": "the stage's recipe", "/dev/shm": "shared memory",
                   "/dev/termination-log": "the trainer's result",
                   "/var/run/alignment/progress": "the stage's progress token",
                   "/opt/alignment/accelerate": "the trainer image's accelerate configs"}
MOUNT_PATH = r"^(/[^/]+)+$"
DOT_SEGMENT = r"(^|/)\.\.?(/|$)"

# distribution/reference's grammar: [domain[:port]/]path[:tag][@digest], path components lowercase.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
IMAGE_REF = (rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
             r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")
IMAGE_MESSAGE = ("must be an image reference like registry.example.com/team/trainer:1.2 or "
                 "trainer@sha256:<hex>: lowercase path, optional :tag and @digest, no spaces")


def _collides(path: str) -> list[str]:
    return [f"{path!r} collides with {reserved} ({why}); choose another path, e.g. /workspace"
            for reserved, why in RESERVED_MOUNTS.items()
            if path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/")][:1]


_CLEAN_MOUNT = "must be an absolute path without '.' or '..' segments or a trailing '/', e.g. /workspace"
# self = the value itself (a string, a map): the rules' Python sides say what is wrong with it.
MOUNT_RULES = [
    Rule(f"self.matches(r'{MOUNT_PATH}') && !self.matches(r'{DOT_SEGMENT}')", f"mountPath {_CLEAN_MOUNT}", "",
         lambda p: bool(re.search(MOUNT_PATH, p)) and not re.search(DOT_SEGMENT, p) or [("", f"{p!r} {_CLEAN_MOUNT}")]),
    Rule("!" + repr(list(RESERVED_MOUNTS)) + ".exists(r, self == r || self.startsWith(r + '/') || r.startsWith(self + '/'))",
         "mountPath must not be, contain or lie inside " + ", ".join(f"{p} ({why})" for p, why in RESERVED_MOUNTS.items()),
         "", lambda p: [("", words) for words in _collides(p)]),
]
IMAGE_RULES = [Rule(f"self.matches(r'{IMAGE_REF}')", f"image {IMAGE_MESSAGE}", "",
                    lambda i: bool(re.search(IMAGE_REF, i)) or [("", f"{i!r} {IMAGE_MESSAGE}")])]


def _node_selector_misses(selector: dict[str, str]) -> list[tuple[str, str]]:
    out = []
    for key, value in selector.items():
        if not corev1._label_name(key):
            out.append(("", f"key {key!r} is not a label key ([prefix/]name, name of at most 63 alphanumerics, '-', "
                            "'_' or '.')"))
        elif not re.search(corev1.LABEL_VALUE, value):
            out.append((f"[{key!r}]", f"{value!r} is not a label value (at most 63 alphanumerics, '-', '_' or '.')"))
    return out


NODE_SELECTOR_RULES = [
    Rule(f"self.all(k, k.matches(r'{corev1.LABEL_NAME}') && self[k].matches(r'{corev1.LABEL_VALUE}'))",
         "nodeSelector keys must be label keys ([prefix/]name) and values label values (at most 63 "
         "alphanumerics, '-', '_' or '.')", "", _node_selector_misses),
]


MountPath = Annotated[str, WithJsonSchema({"type": "string", "maxLength": 1024,
                                           "x-kubernetes-validations": [r.item() for r in MOUNT_RULES]})]
ImageRef = Annotated[str, WithJsonSchema({"type": "string", "maxLength": 1024,
                                          "x-kubernetes-validations": [r.item() for r in IMAGE_RULES]})]
NodeSelector = Annotated[dict[str, str], WithJsonSchema({
    "type": "object", "maxProperties": 64, "additionalProperties": {"type": "string", "maxLength": 63},
    "x-kubernetes-validations": [r.item() for r in NODE_SELECTOR_RULES]})]
# ---------------------------------------------------------------------------- training.extraArgs

@cache
def trl_fields() -> dict[str, Any]:
    return json.loads(Path(__file__).with_name("trl_fields.json").read_text())


def typed_fields() -> list[str]:
    """Recipe fields the API sets from its own typed training fields."""
    return sorted(set(TrainingArgs.model_fields) - {"extra_args"})


def config_fields(method: str) -> set[str] | None:
    """The TRL config fields a method's stage accepts; None for a method without one (eval)."""
    data = trl_fields()
    config = data["methods"].get(method)
    return None if config is None else set(data["common"]) | set(data["configs"][config])


def accepted_extra_args() -> list[str]:
    """Keys training.extraArgs may hold in some stage: every method's TRL config fields but the
    ones the trainer sets itself or the API has a typed field for."""
    data = trl_fields()
    return sorted(set(data["help"]) - set(data["owned"]) - set(typed_fields()))


def extra_args_schema() -> dict[str, Any]:
    """The CRD schema of training.extraArgs: one property per accepted key, its value any JSON
    (the trainer's TRL checks it). The API server refuses any other key like every unknown field
    (`kubectl apply` asks for strict field validation); which config each method builds is
    checked by `alignctl validate` and by the trainer."""
    help_ = trl_fields()["help"]
    return {"type": "object", "properties": {
        key: {"x-kubernetes-preserve-unknown-fields": True, "description": help_[key]} for key in accepted_extra_args()}}


def extra_args_problems(at: str, method: str, extra: dict[str, Any]) -> list[str]:
    data = trl_fields()
    accepted = config_fields(method)
    out = []
    typed = {"per_device_eval_batch_size": "per_device_train_batch_size"}  # the run sets both from one
    for key in extra:
        path = f"{at}.training.extraArgs.{key}"
        if key in data["owned"]:
            out.append(f"{path}: set by the trainer itself, not configurable")
        elif key in typed_fields():
            out.append(f"{path}: set training.{api_alias(typed.get(key, key))} instead")
        elif accepted is None:
            out.append(f"{path}: method {method!r} builds no TRL config; leave training.extraArgs empty")
        elif key not in accepted:
            import difflib

            close = difflib.get_close_matches(key, sorted(accepted), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            out.append(f"{path}: not a {data['methods'][method]} field in TRL {data['trl']}{hint}")
    return out


# ---------------------------------------------------------------------------- the spec, in Python

def problems(spec: Any) -> list[str]:
    """Everything above for one AlignmentRunSpec, one 'field.path: what is wrong' line each."""
    out = rule_problems(MOUNT_RULES, spec.storage.mount_path, "spec.storage.mountPath")[:1]  # the first says enough
    t = spec.trainer
    if t.image is not None:
        out += rule_problems(IMAGE_RULES, t.image, "spec.trainer.image")
    out += rule_problems(NODE_SELECTOR_RULES, t.node_selector, "spec.trainer.nodeSelector")
    for field, name in (("env", "EnvVar"), ("envFrom", "EnvFromSource"), ("tolerations", "Toleration")):
        for i, item in enumerate(getattr(t, {"envFrom": "env_from"}.get(field, field))):
            out += corev1.problems(name, item, f"spec.trainer.{field}[{i}]")
    if t.affinity is not None:
        out += corev1.problems("Affinity", t.affinity, "spec.trainer.affinity")
    for i, stage in enumerate(spec.stages):
        out += extra_args_problems(f"spec.stages[{i}]", stage.method, stage.training.extra_args)
    return out


ExtraArgs = Annotated[dict[str, Any], WithJsonSchema(extra_args_schema())]
