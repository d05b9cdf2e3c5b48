"""The rules a stage obeys alike in a run and in a recipe, stated once.

Each is a `Rule`: the CEL rule and its message, which the operator puts into the AlignmentRun CRD
(x-kubernetes-validations of a stage or of its training), and `ok`, the same test in Python on the object as
the API server sees it (camelCase, a few names shortened by API_NAMES, unset optionals left out). The
operator's table (alignment_operator/api/rules.py) takes these and adds what only a run names (stages it
reads from, Secrets, resources, a matrix); `alignctl validate` evaluates them on a run, Recipe._check on a
recipe seen in the run's names (api_view), its refusals worded back in the recipe's names (recipe_problems).

Part of the trainer's torch-free contract: pydantic only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, get_args

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from .methods import LABEL_SMOOTHING_LOSSES, LABEL_SMOOTHING_NEEDED, METHODS, label_smoothing_problem, loss_type_problem

# A field of a section the run shares with the recipe is named in the run by its recipe name (TRL's, PEFT's) in
# camelCase, but where the run says it shorter: recipe name -> the run's.
API_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "num_train_epochs": "epochs",
             "lr_scheduler_type": "scheduler", "per_device_train_batch_size": "per_device_batch_size",
             "torch_dtype": "dtype", "attn_implementation": "attention"}


def api_alias(name: str) -> str:
    return to_camel(API_NAMES.get(name, name))


# Where a rule's Python test finds it broken, when it can say more than its message: (the path relative to
# the rule's object, what is wrong there in words: the value, what would be accepted).
Miss = tuple[str, str]


@dataclass(frozen=True)
class Rule:
    """One admission rule, stated once: the CEL `cel` with its `message` (the CRD's
    x-kubernetes-validations on the object it is attached to), `field` the path the message is about
    (relative, as CEL's fieldPath; "" the object itself), and `ok` the same test in Python on the same
    object as CEL sees it (camelCase keys, defaults filled in, `self` that object), which
    `alignctl validate`, the operator and a recipe evaluate. `ok` returns whether the object passes, or,
    where Python can name more (the list item, the value, what is accepted), the places it fails (Miss).
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


def get(obj: Any, dotted: str) -> Any:
    """obj's value at a dotted path of mappings, None where one is missing."""
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def said(path: str, words: str | None) -> list[Miss]:
    return [(path, words)] if words else []


# ---------------------------------------------------------------------------- a stage (self = one stage)

def data_rules() -> list[Rule]:
    """What a stage reads: datasets, and its test split."""
    without_data = [m for m, info in METHODS.items() if not (info.trains or info.writes)]
    return [
        Rule(" || ".join(f"self.method == '{m}'" for m in without_data) + " || size(self.datasets) > 0",
             "a training, generate or label stage needs at least one dataset", ".datasets",
             lambda s: s["method"] in without_data or bool(s["datasets"]) or [
                 (".datasets", f"method {s['method']!r} needs at least one dataset")]),
        Rule("!(size(self.testDatasets) > 0 && has(self.testSplitSize))",
             "give testDatasets or testSplitSize, not both", ".testSplitSize",
             lambda s: not (s["testDatasets"] and "testSplitSize" in s)),
        Rule("!has(self.testSplitSize) || self.testSplitSize < 1.0 || "
             "self.testSplitSize == double(int(self.testSplitSize))",
             "testSplitSize must be a fraction below 1 or a whole number of rows", ".testSplitSize",
             lambda s: s.get("testSplitSize", 0) < 1 or s["testSplitSize"] == int(s["testSplitSize"])),
    ]


def _label_smoothing_rules() -> list[Rule]:
    """training.labelSmoothing only where the loss reads it (methods.label_smoothing_problem)."""
    reads = list(LABEL_SMOOTHING_LOSSES)
    default_reads = [m for m, info in METHODS.items() if info.default_loss_type in reads]
    by_default = f"self.method in {default_reads}" if default_reads else "false"

    def problem(s: dict, above_zero: bool) -> list[Miss]:
        t = s["training"]
        smoothing = t.get("labelSmoothing", 0.0)
        if bool(smoothing) != above_zero or loss_type_problem(s["method"], t.get("lossType")):
            return []  # the other rule's case, or a loss the lossType rule refuses
        return said(".training.labelSmoothing",
                    label_smoothing_problem(s["method"], t.get("lossType"), smoothing, "lossType"))
    return [
        Rule("!has(self.training.labelSmoothing) || self.training.labelSmoothing == 0.0 || "
             f"(has(self.training.lossType) ? self.training.lossType in {reads} : {by_default})",
             f"training.labelSmoothing above 0 is read only by the lossTypes {', '.join(reads)} (method dpo); with "
             "this stage's method and lossType it would be ignored: set one of them or leave labelSmoothing 0",
             ".training.labelSmoothing", lambda s: problem(s, True)),
        Rule(f"!has(self.training.lossType) || !(self.training.lossType in {list(LABEL_SMOOTHING_NEEDED)}) || "
             "(has(self.training.labelSmoothing) && self.training.labelSmoothing > 0.0)",
             f"lossType {' and '.join(LABEL_SMOOTHING_NEEDED)} need training.labelSmoothing, the fraction of flipped "
             "labels, with 0 < epsilon < 0.5", ".training.labelSmoothing", lambda s: problem(s, False)),
    ]


def loss_rules() -> list[Rule]:
    """The loss a stage's method trains with, and the label smoothing it reads."""
    with_losses = {m: info.loss_types for m, info in METHODS.items() if info.loss_types}
    return [
        Rule("!has(self.training.lossType) || " + " || ".join(
                f"(self.method == '{m}' && self.training.lossType in {list(t)})" for m, t in with_losses.items()),
             "lossType is not one of this method's losses: " + "; ".join(
                 f"{m}: {', '.join(t)}" for m, t in with_losses.items()), ".training.lossType",
             lambda s: said(".training.lossType", loss_type_problem(s["method"], s["training"].get("lossType")))),
        *_label_smoothing_rules(),
    ]


def section_rule(method: str) -> Rule:
    """A method that reads a section of its own (grpo, label) needs it."""
    return Rule(f"self.method != '{method}' || has(self.{method})",
                f"method {method} needs a {method} section with rewards", f".{method}",
                lambda s: s["method"] != method or method in s)


REWARD_SECTIONS = ("grpo", "label", "eval")


def reward_misses(s: dict, section: str, test: Callable[[dict], Any], field: str,
                  words: Callable[[dict], str]) -> list[Miss]:
    """(path, words) for each of `section`'s rewards that fails `test`, at its `field`."""
    return [(f".{section}.rewards[{k}].{field}", words(r))
            for k, r in enumerate(get(s, f"{section}.rewards") or []) if not test(r)]


def reward_pattern_rule(section: str) -> Rule:
    """A rule reward that matches text (regex, format) needs its pattern."""
    return Rule(f"!has(self.{section}) || self.{section}.rewards.all(r, !(r.kind in ['regex', 'format']) || "
                "has(r.pattern))", f"{section}.rewards: a regex or format reward needs a pattern", f".{section}.rewards",
                lambda s: reward_misses(s, section, lambda r: r["kind"] not in ("regex", "format") or r.get("pattern"),
                                        "pattern", lambda r: f"a {r['kind']} reward needs a pattern (a Python regex)"))


def eval_rules() -> list[Rule]:
    """What an eval section's measurements need."""
    def graded_need_judge(s: dict) -> bool | list[Miss]:
        graded = [name for name in ("alpacaEval", "mtBench") if get(s, f"eval.{name}") is not None]
        return not graded or "judge" in s["eval"] or [
            (".eval.judge", f"eval.{' and eval.'.join(graded)} need an LLM judge; set eval.judge")]
    return [
        Rule("!has(self.eval) || size(self.eval.rewards) == 0 || has(self.eval.prompts)",
             "eval.rewards score the answers to eval.prompts: set eval.prompts", ".eval.prompts",
             lambda s: not get(s, "eval.rewards") or "prompts" in s["eval"] or [
                 (".eval.prompts", "eval.rewards score the answers to a prompt set; set eval.prompts (prompts with "
                                   "the reference columns the rewards read)")]),
        Rule("!has(self.eval) || !('judge' in self.eval.metrics) || has(self.eval.judge)",
             "eval.metrics includes judge but eval.judge is not set", ".eval.judge",
             lambda s: "judge" not in (get(s, "eval.metrics") or []) or "judge" in s["eval"] or [
                 (".eval.judge", "eval.metrics includes judge but no judge is configured")]),
        Rule("!has(self.eval) || !(has(self.eval.alpacaEval) || has(self.eval.mtBench)) || has(self.eval.judge)",
             "eval.alpacaEval and eval.mtBench are graded by an LLM judge: set eval.judge", ".eval.judge",
             graded_need_judge),
    ]


def training_rules() -> list[Rule]:
    """self = a stage's training."""
    return [
        Rule("!has(self.maxPromptLength) || self.maxPromptLength < self.maxLength",
             "maxPromptLength must be below maxLength", ".maxPromptLength",
             lambda t: "maxPromptLength" not in t or t["maxPromptLength"] < t["maxLength"] or [(
                 ".maxPromptLength", f"maxPromptLength must be below maxLength ({t['maxPromptLength']} is not below "
                                     f"{t['maxLength']})")]),
    ]


def recipe_rules() -> list[Rule]:
    """Every rule of a stage that a recipe holds too (self = the stage; its training's: training_rules)."""
    return [*data_rules(), *loss_rules(), section_rule("grpo"), section_rule("label"),
            *(reward_pattern_rule(x) for x in REWARD_SECTIONS), *eval_rules()]


# ---------------------------------------------------------------------------- a recipe in the run's names

def api_view(model: BaseModel) -> dict[str, Any]:
    """A recipe's object as the run's rules see it: the run's names (api_alias), unset optionals left out."""
    def view(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return api_view(value)
        return [view(v) for v in value] if isinstance(value, list) else value
    return {api_alias(name): view(value) for name, value in model if value is not None}


def recipe_names(model: type[BaseModel]) -> dict[str, str]:
    """The run's name -> the recipe's, for every field of `model` and of the sections it holds."""
    names: dict[str, str] = {}

    def walk(cls: Any) -> None:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            for name, field in cls.model_fields.items():
                if api_alias(name) not in names:
                    names[api_alias(name)] = name
                    walk(field.annotation)
        for arg in get_args(cls):
            walk(arg)
    walk(model)
    return names


def recipe_problems(rules: list[Rule], obj: BaseModel, at: str, names: dict[str, str]) -> list[str]:
    """'path: what is wrong' for each rule `obj` breaks, the run's field names in path and words turned into the
    recipe's (names: recipe_names)."""
    def ours(text: str) -> str:
        return re.sub(r"\b[a-z]+(?:[A-Z][a-z0-9]*)+\b", lambda m: names.get(m.group(0), m.group(0)), text)
    view = api_view(obj)
    return [ours(f"{at}{path}: {words}").lstrip(".") for rule in rules for path, words in rule.misses(view)]
