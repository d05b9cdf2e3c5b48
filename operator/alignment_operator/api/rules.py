"""The rule table: every cross-field rule of an AlignmentRun, once.

Each entry is a `Rule` (api.base): the CEL rule and its message, which the models in spec.py put into the
CRD (x-kubernetes-validations), and `ok`, the same test in Python on the same object as CEL sees it
(camelCase keys, defaults filled in, `self` the object the rule is attached to), which `alignctl validate`
and the operator evaluate (api.checks). Where Python can say more than a static CEL message (the list item,
the value, the names that would be accepted), `ok` returns those places. The tables read the trainer's
method table (METHODS, its losses, what each method reads and writes) when they are asked for, so a new row
reaches the CRD and validation alike. The rules a stage holds in a recipe too (datasets, test split, loss, label
smoothing, grpo/label sections, rewards' patterns, eval's judge and prompts, training's maxPromptLength) are the
trainer's contract's (alignment_trainer.rules), where Recipe evaluates them; this table adds what only a run names.

Adding a rule is one entry in the list of the object it is about (stage_rules: a stage, run_rules: the
spec, ...), then `alignctl crd -o crds/alignmentrun.yaml` (and the chart's copy), and a manifest in
tests/manifests/bad/ that breaks it.
"""

from __future__ import annotations

import re
from typing import Any

from alignment_trainer.recipe import METHODS, loss_type_problem, output_kind, reads_outputs, training_methods
from alignment_trainer.rules import (REWARD_SECTIONS, data_rules, eval_rules, get as _get, loss_rules, reward_misses,
                                     reward_pattern_rule, said as _said, section_rule,
                                     training_rules)  # noqa: F401  (a stage's training: the recipe's rules alone)

from .base import Miss, Rule, api_alias

REGEX_MESSAGE = ("must be a regular expression that both Python's re (the trainer's) and RE2 (the API server's) "
                 "read: no lookaround, backreferences or possessive quantifiers")
REWARD_STAGE_MESSAGE = "must name an earlier reward stage"
# eval's datasets that may name a data stage instead of a source.
EVAL_DATA_FIELDS = ("prompts", "alpacaEval.referenceOutputs", "alpacaEval.prompts", "mtBench.questions")
HUB_WITH_PROMOTE = ("hub pushes the last stage's model whatever promote decides; with promote, push the promoted "
                    "model only: promote.exports: [{uri: hf://<repoId>}]")
HF_EXPORT_TOKEN = ("an hf:// export needs trainer.hfTokenSecretRef (a Secret with a Hugging Face token with write "
                   "access)")
MATRIX_MAX_VARIANTS = 16  # a matrix's variants (the product of its value lists' sizes), at most
# Training fields only some methods read (the rest every training method reads): a matrix over one of
# these on another method is refused, as it would train the same thing N times.
MATRIX_METHOD_FIELDS: dict[str, list[str]] = {
    "beta": [m for m, i in METHODS.items() if i.trains and i.beta is not None],
    "loss_type": [m for m, i in METHODS.items() if i.trains and len(i.loss_types) > 1],
    "label_smoothing": ["dpo"],
    "slic_lambda": ["slic"],
    "packing": ["sft"],
    "completion_only_loss": ["sft"],
    "precompute_ref_log_probs": [m for m, i in METHODS.items() if i.trains and i.reference],
    "max_prompt_length": [m for m, i in METHODS.items() if i.trains and m != "sft"],
}


def _names(stages: list[dict], keep=lambda t: True) -> list[str]:
    return list(dict.fromkeys(t["name"] for t in stages if keep(t)))


def _listed(names: list[str], none: str = "none") -> str:
    return ", ".join(names) or none


def _kind(stage: dict) -> str | None:
    """What kind of dataset a stage writes (recipe.output_kind), None if it writes none."""
    return output_kind(stage["method"], _get(stage, "label.feedback"))


# ---------------------------------------------------------------------------- one object's rules (api.base.holds)

# An s3:// source or export: s3://bucket[/prefix], the bucket an S3 bucket name (3-63 lowercase letters,
# digits, '.', '-'); never credentials in it (they come from objectStore.credentialsSecretName).
# No \s in it: CEL string literals refuse that escape (the CRD would not compile); \t \n \r are CEL's too.
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^@ \t\n\r]*)?$"
S3_URI_MESSAGE = ("an s3:// URI is s3://bucket/prefix: a bucket of 3-63 lowercase letters, digits, '.' and '-', "
                  "no credentials (objectStore.credentialsSecretName holds them)")
# A Hub export: hf://org/name (a model repository, HubSpec.repo_id's form).
HF_URI = r"^hf://[A-Za-z0-9][-_.A-Za-z0-9]*/[-_.A-Za-z0-9]+$"
# A URI never carries credentials (user:password@host): its rule never shows the value, as a pattern's
# refusal would; they come from a Secret.
URI_CREDENTIALS = "^[a-z]+://[^/]*@"
JUDGE_URL_MESSAGE = "judge.baseUrl must not hold credentials (user:password@); the key comes from apiKeySecretRef"


def _credentials(uri: Any) -> bool:
    return isinstance(uri, str) and re.match(URI_CREDENTIALS, uri) is not None


def _s3_rule(field: str, optional: bool = True) -> Rule:
    """An s3:// value of `field` must be s3://bucket/prefix; a refused URI that holds credentials is never
    echoed, a bad bucket name is."""
    def ok(o: dict) -> bool | list[Miss]:
        value = o.get(field)
        if not isinstance(value, str) or not value.startswith("s3://") or re.match(S3_URI, value):
            return True
        shown = "an s3:// URI with credentials (user:key@)" if "@" in value else repr(value)
        return [(f".{field}", f"{field}: {shown}: {S3_URI_MESSAGE}")]
    return Rule((f"!has(self.{field}) || " if optional else "")
                + f"!self.{field}.startsWith('s3://') || self.{field}.matches('{S3_URI}')",
                S3_URI_MESSAGE, f".{field}", ok, show=False)


def model_rules() -> list[Rule]:
    """self = spec.model."""
    return [_s3_rule("source")]


def dataset_rules() -> list[Rule]:
    """self = a dataset (stages[].datasets[], testDatasets[], eval's prompt sets)."""
    return [
        Rule("has(self.source) != has(self.stage)", "a dataset gives exactly one of source or stage", "",
             lambda d: ("source" in d) != ("stage" in d) or [("", (
                 "a dataset gives exactly one of source or stage: source a file, directory or Hub id, stage (an "
                 "earlier generate or label stage)"))]),
        _s3_rule("source"),
    ]


def wandb_rules() -> list[Rule]:
    return [Rule("self.mode == 'offline' || has(self.apiKeySecretRef)",
                 "wandb.apiKeySecretRef is required unless mode is offline", ".apiKeySecretRef",
                 lambda w: w["mode"] == "offline" or "apiKeySecretRef" in w)]


def mlflow_rules() -> list[Rule]:
    return [Rule(f"!self.trackingUri.matches('{URI_CREDENTIALS}')",
                 "mlflow.trackingUri must not hold credentials (user:password@); give credentialsSecretName",
                 ".trackingUri", lambda m: not _credentials(m.get("trackingUri")), show=False)]


def judge_rules() -> list[Rule]:
    return [Rule(f"!self.baseUrl.matches('{URI_CREDENTIALS}')", JUDGE_URL_MESSAGE, ".baseUrl",
                 lambda j: not _credentials(j.get("baseUrl")), show=False)]


def gate_rules() -> list[Rule]:
    """self = promote.gates[]."""
    one = "a gate gives exactly one of min, max or atLeastAsGoodAs"
    return [Rule("(has(self.min) ? 1 : 0) + (has(self.max) ? 1 : 0) + (has(self.atLeastAsGoodAs) ? 1 : 0) == 1",
                 one, "", lambda g: sum(k in g for k in ("min", "max", "atLeastAsGoodAs")) == 1 or [
                     ("", f"gate on {g['metric']}: {one}")])]


def export_rules() -> list[Rule]:
    """self = promote.exports[]."""
    return [
        _s3_rule("uri", optional=False),
        Rule("self.uri.startsWith('s3://') || self.uri.matches('" + HF_URI + "')",
             "uri is s3://bucket/prefix (an object store) or hf://org/name (a Hugging Face Hub model repository)",
             ".uri", lambda e: e["uri"].startswith("s3://") or bool(re.match(HF_URI, e["uri"])) or [(".uri", (
                 f"uri: {e['uri']!r} is neither s3://bucket/prefix (an object store) nor hf://org/name (a Hugging "
                 "Face Hub model repository)"))]),
    ]


# ---------------------------------------------------------------------------- reward patterns (RE2 and re)

def _python_only(pattern: str) -> str | None:
    """The first construct of `pattern` that Python's re reads and RE2 refuses (lookaround, backreferences,
    atomic groups, conditionals, possessive quantifiers, \\Z); escapes and character classes skipped."""
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if pattern[i + 1:i + 2] in set("123456789Z"):
                return pattern[i:i + 2]
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 2 if pattern[i + 1:i + 2] == "]" else 1  # a leading ] is a member
            continue
        elif c == "(":
            for head in ("(?=", "(?!", "(?<=", "(?<!", "(?P=", "(?>", "(?("):
                if pattern.startswith(head, i):
                    return head
        elif c in "*+?}" and pattern[i + 1:i + 2] == "+" and not (c == "?" and pattern[i - 1:i] == "("):
            return pattern[i:i + 2]
        i += 1
    return None


def regex_problem(pattern: str) -> str | None:
    """Why a reward's pattern is refused (REGEX_MESSAGE and the reason), None when both engines read it."""
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{REGEX_MESSAGE} ({e})"
    found = _python_only(pattern)
    return f"{REGEX_MESSAGE} (RE2 has no {found!r})" if found else None


def _pattern_misses(reward: dict) -> list[Miss]:
    problem = regex_problem(reward["pattern"]) if "pattern" in reward else None
    return _said(".pattern", problem and f"{reward['pattern']!r} {problem}")


def reward_rules() -> list[Rule]:
    """self = one reward (grpo's, label's, eval's). RE2 compiles the pattern when the rule runs: a pattern it
    cannot read fails the rule with its reason."""
    return [Rule("!has(self.pattern) || (''.matches(self.pattern) ? true : true)", f"pattern {REGEX_MESSAGE}",
                 ".pattern", _pattern_misses)]


# ---------------------------------------------------------------------------- a stage

def _reward_rules(section: str) -> list[Rule]:
    """A section's rewards: the recipe's pattern rule, and what a run's reward names (a stage, a judge's Secret)."""
    def each(test, field: str, words: str):
        return lambda s: reward_misses(s, section, test, field, lambda r: words)
    return [
        reward_pattern_rule(section),
        Rule(f"!has(self.{section}) || self.{section}.rewards.all(r, r.kind != 'reward_model' || has(r.rewardModel))",
             f"{section}.rewards: a reward_model reward needs rewardModel (an earlier reward stage)",
             f".{section}.rewards", each(lambda r: r["kind"] != "reward_model" or "rewardModel" in r, "rewardModel",
                                         "a reward_model reward needs rewardModel (an earlier reward stage)")),
        Rule(f"!has(self.{section}) || self.{section}.rewards.all(r, r.kind != 'judge' || has(r.judge))",
             f"{section}.rewards: a judge reward needs judge (baseUrl, model, apiKeySecretRef)", f".{section}.rewards",
             each(lambda r: r["kind"] != "judge" or "judge" in r, "judge",
                  "a judge reward needs judge (baseUrl, model, apiKeySecretRef)")),
    ]


def matrix_rules() -> list[Rule]:
    """A matrix only on a training stage, over fields its method reads, with losses its method has (self = a
    stage; api.matrix evaluates them before it expands the matrix, on the stage as written)."""
    trains = [m for m, i in METHODS.items() if i.trains]
    out = [Rule(f"!has(self.matrix) || self.method in {trains}",
                f"matrix: only a training stage ({', '.join(trains)}) sweeps its training fields", ".matrix",
                lambda s: "matrix" not in s or s["method"] in trains or [(
                    ".matrix", f"method {s['method']!r} trains nothing; only a training stage sweeps its training "
                               "fields")])]

    def reads(s: dict, alias: str, methods: list[str]) -> bool | list[Miss]:
        if alias not in s.get("matrix", {}) or s["method"] in methods or s["method"] not in trains:
            return True
        fields = [f for f in s["matrix"] if f not in ALIASES or s["method"] in MATRIX_METHOD_FIELDS[ALIASES[f]]]
        return [(f".matrix.{alias}", f"only methods {', '.join(methods)} read training.{alias}, not method "
                                     f"{s['method']!r}; accepted fields for {s['method']}: {', '.join(fields)}")]
    ALIASES = {api_alias(name): name for name in MATRIX_METHOD_FIELDS}
    for name, methods in MATRIX_METHOD_FIELDS.items():
        alias = api_alias(name)
        out.append(Rule(f"!has(self.matrix) || !has(self.matrix.{alias}) || self.method in {methods}",
                        f"matrix.{alias}: only methods {', '.join(methods)} read training.{alias}", f".matrix.{alias}",
                        lambda s, alias=alias, methods=methods: reads(s, alias, methods)))
    with_losses = {m: info.loss_types for m, info in METHODS.items() if len(info.loss_types) > 1}
    message = "matrix.lossType holds a loss that is not one of this method's: " + "; ".join(
        f"{m}: {', '.join(t)}" for m, t in with_losses.items())
    out.append(Rule(
        "!has(self.matrix) || !has(self.matrix.lossType) || self.matrix.lossType.all(x, "
        + " || ".join(f"(self.method == '{m}' && x in {list(t)})" for m, t in with_losses.items()) + ")",
        message, ".matrix.lossType",
        lambda s: [] if s["method"] not in trains else [
            (".matrix.lossType", f"{v!r}: a loss that is not one of this method's: {loss_type_problem(s['method'], v)}")
            for v in _get(s, "matrix.lossType") or [] if loss_type_problem(s["method"], v)]))
    return out


def matrix_size_rules(fields: list[str]) -> list[Rule]:
    """self = a stage's matrix, whose `fields` are the training fields' camelCase names."""
    def size(m: dict) -> bool | list[Miss]:
        sizes = [len(m[f]) for f in fields if f in m]
        count = 1
        for n in sizes:
            count *= n
        return count <= MATRIX_MAX_VARIANTS or [("", (
            f"a matrix expands into at most {MATRIX_MAX_VARIANTS} variants; this one into {count} "
            f"({' x '.join(map(str, sizes))}): split the sweep into several runs or fewer values"))]
    return [Rule(" * ".join(f"(has(self.{f}) ? size(self.{f}) : 1)" for f in fields) + f" <= {MATRIX_MAX_VARIANTS}",
                 f"a matrix expands into at most {MATRIX_MAX_VARIANTS} variants (the product of its lists' sizes)",
                 "", size)]


def stage_rules() -> list[Rule]:
    """self = one stage: the rules a recipe holds too (alignment_trainer.rules) and those of what only a run
    names (a matrix, resources, rewards that name stages and Secrets), in the CRD's order."""
    return [
        *data_rules(),
        *loss_rules(),
        *matrix_rules(),
        Rule("!has(self.lora) || self.lora.quantization == 'none' || self.resources.gpusPerNode > 0",
             "lora.quantization 4bit/8bit needs GPUs (resources.gpusPerNode > 0)", ".lora.quantization",
             lambda s: _get(s, "lora.quantization") in (None, "none") or s["resources"]["gpusPerNode"] > 0 or [
                 (".lora.quantization", f"{s['lora']['quantization']!r} needs GPUs (resources.gpusPerNode > 0); "
                                        "use 'none' on CPU")]),
        section_rule("grpo"),
        *_reward_rules("grpo"),
        section_rule("label"),
        *_reward_rules("label"),
        *_reward_rules("eval"),
        *eval_rules(),
    ]


# ---------------------------------------------------------------------------- the run (self = spec)

# How a stage's CEL expression tells what kind of dataset an earlier stage `t` writes (recipe.output_kind).
_OUTPUT_KIND_CEL = {
    "completions": "t.method == 'generate'",
    "pairwise": "(t.method == 'label' && has(t.label) && t.label.feedback == 'pairwise')",
    "unpaired": "(t.method == 'label' && has(t.label) && t.label.feedback == 'binary')",
}
OUTPUT_KIND_NAMES = {"completions": "a generate stage", "pairwise": "a label stage with feedback pairwise",
                     "unpaired": "a label stage with feedback binary"}


def grouped_readers() -> dict[tuple[str, ...], list[str]]:
    """The kinds of output each group of methods reads (recipe.reads_outputs), methods that read none left out."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in METHODS:
        if reads_outputs(m):
            groups.setdefault(reads_outputs(m), []).append(m)
    return groups


def data_stage_message() -> str:
    """eval's prompt sets read a data stage's dataset: any method of the table that writes one."""
    return "must name an earlier " + " or ".join(m for m, info in METHODS.items() if info.writes) + " stage"


def _each_stage(spec: dict, miss) -> list[Miss]:
    """miss(i, stage, earlier stages) -> the places stage i breaks a rule, for every stage."""
    return [m for i, s in enumerate(spec["stages"]) for m in miss(i, s, spec["stages"][:i])]


def _dataset_stage_misses(i: int, s: dict, earlier: list[dict]) -> list[Miss]:
    wanted = reads_outputs(s["method"])
    readable = _names(earlier, lambda t: _kind(t) in wanted)
    what = (f"method {s['method']} reads no stage's output (give a source)" if not wanted else
            f"must name an earlier stage whose output the method reads (method {s['method']} reads "
            f"{' or '.join(wanted)} data)")
    return [(f".stages[{i}].{field}[{k}].stage", f"{d['stage']!r} {what}; accepted: {_listed(readable)}")
            for field in ("datasets", "testDatasets") for k, d in enumerate(s[field])
            if "stage" in d and d["stage"] not in readable]


def _eval_data_stage_misses(i: int, s: dict, earlier: list[dict]) -> list[Miss]:
    data_stages = _names(earlier, _kind)
    return [(f".stages[{i}].eval.{field}.stage", f"{d['stage']!r} {data_stage_message()}; accepted: "
                                                 f"{_listed(data_stages)}")
            for field in EVAL_DATA_FIELDS for d in [_get(s, f"eval.{field}")]
            if isinstance(d, dict) and "stage" in d and d["stage"] not in data_stages]


def _reward_stage(path: str, name: Any, earlier: list[dict]) -> list[Miss]:
    """`name` at `path` must be an earlier reward stage's."""
    rewards = _names(earlier, lambda t: t["method"] == "reward")
    if name is None or name in rewards:
        return []
    return [(path, f"{name!r} {REWARD_STAGE_MESSAGE}; accepted: {_listed(rewards, 'none (add a stage with method reward)')}")]


def _reward_model_misses(i: int, s: dict, earlier: list[dict]) -> list[Miss]:
    return [m for x in REWARD_SECTIONS for k, r in enumerate(_get(s, f"{x}.rewards") or [])
            for m in _reward_stage(f".stages[{i}].{x}.rewards[{k}].rewardModel", r.get("rewardModel"), earlier)]


def _earlier(path: str, value: Any, message: str, names: list[str], none: str = "none") -> list[Miss]:
    """`value` at `path` must be one of `names`, refused (with `message` and the names) when it is another."""
    if value is None or value in names:
        return []
    return [(path, f"{value!r}: {message}; accepted: {_listed(names, none)}")]


def _stage_dataset_rule() -> Rule:
    """datasets[].stage names an earlier stage whose output the method reads (recipe.reads_outputs)."""
    accepts = " || ".join(f"(s.method in {ms} && ({' || '.join(_OUTPUT_KIND_CEL[k] for k in kinds)}))"
                          for kinds, ms in grouped_readers().items())
    # datasets and testDatasets one after the other: CEL types them apart, so `+` does not join them.
    names = f"self.stages.exists(j, t, j < i && t.name == d.stage && ({accepts}))"
    return Rule(f"self.stages.all(i, s, s.datasets.all(d, !has(d.stage) || {names}) && "
                f"s.testDatasets.all(d, !has(d.stage) || {names}))",
                "stages[].datasets[].stage must name an earlier stage whose output the method reads: " + "; ".join(
                    f"{', '.join(ms)}: {' or '.join(OUTPUT_KIND_NAMES[k] for k in kinds)}"
                    for kinds, ms in grouped_readers().items()), ".stages",
                lambda spec: _each_stage(spec, _dataset_stage_misses))


def _rewards_model_rule() -> Rule:
    """grpo's, label's and eval's rewards[].rewardModel name an earlier reward stage."""
    names = ("r.rewardModel", "self.stages.exists(j, t, j < i && t.name == r.rewardModel && t.method == 'reward')")
    each = " && ".join(f"(!has(s.{x}) || s.{x}.rewards.all(r, !has({names[0]}) || {names[1]}))" for x in REWARD_SECTIONS)
    return Rule(f"self.stages.all(i, s, {each})",
                f"stages[].{{{','.join(REWARD_SECTIONS)}}}.rewards[].rewardModel {REWARD_STAGE_MESSAGE}", ".stages",
                lambda spec: _each_stage(spec, _reward_model_misses))


def _eval_data_stage_rule() -> Rule:
    writers = [m for m, info in METHODS.items() if info.writes]
    checks = []
    for field in EVAL_DATA_FIELDS:
        d = f"s.eval.{field}"
        names = f"(!has({d}.stage) || self.stages.exists(j, t, j < i && t.name == {d}.stage && t.method in {writers}))"
        guard = " && ".join(f"has(s.eval.{'.'.join(field.split('.')[:k + 1])})" for k in range(field.count(".") + 1))
        checks.append(f"(!({guard}) || {names})")
    return Rule(f"self.stages.all(i, s, !has(s.eval) || ({' && '.join(checks)}))",
                f"stages[].eval.{{{','.join(EVAL_DATA_FIELDS)}}}.stage {data_stage_message()}", ".stages",
                lambda spec: _each_stage(spec, _eval_data_stage_misses))


def _evals(spec: dict) -> list[str]:
    return _names(spec["stages"], lambda t: t["method"] == "eval")


def _promote_rules() -> list[Rule]:
    """promote names eval stages."""
    def gates(spec: dict) -> list[Miss]:
        evals = _evals(spec)
        return [(f".promote.gates[{k}].atLeastAsGoodAs", f"{g['atLeastAsGoodAs']!r} is not an eval stage; "
                                                         f"accepted: {_listed(evals)}")
                for k, g in enumerate(_get(spec, "promote.gates") or [])
                if evals and "atLeastAsGoodAs" in g and g["atLeastAsGoodAs"] not in evals]
    return [
        Rule("!has(self.promote) || self.stages.exists(s, s.method == 'eval')",
             "promote decides on an eval stage's results: add a stage with method eval", ".promote",
             lambda spec: "promote" not in spec or bool(_evals(spec))),
        Rule("!has(self.promote) || !has(self.promote.eval) || "
             "self.stages.exists(s, s.name == self.promote.eval && s.method == 'eval')",
             "promote.eval must name an eval stage", ".promote.eval",
             lambda spec: not _evals(spec) or _earlier(".promote.eval", _get(spec, "promote.eval"),
                                                       "promote.eval must name an eval stage", _evals(spec))),
        Rule("!has(self.promote) || self.promote.gates.all(g, !has(g.atLeastAsGoodAs) || "
             "self.stages.exists(s, s.name == g.atLeastAsGoodAs && s.method == 'eval'))",
             "promote.gates[].atLeastAsGoodAs must name an eval stage", ".promote.gates", gates),
    ]


def ship_rules() -> list[Rule]:
    """What ships (hub, promote): self = the spec as written (promote names an eval stage, not its entries)."""
    hub_exports = lambda spec: any(e["uri"].startswith("hf://") for e in _get(spec, "promote.exports") or [])  # noqa: E731
    return [
        Rule("!has(self.hub) || has(self.trainer.hfTokenSecretRef)",
             "hub: pushing needs trainer.hfTokenSecretRef (a Secret with a Hugging Face token with write access)",
             ".hub", lambda spec: "hub" not in spec or "hfTokenSecretRef" in spec["trainer"], local=False),
        Rule("!has(self.hub) || !has(self.promote)", HUB_WITH_PROMOTE, ".hub",
             lambda spec: "hub" not in spec or "promote" not in spec),
        Rule("!has(self.promote) || !has(self.promote.exports) || "
             "!self.promote.exports.exists(e, e.uri.startsWith('hf://')) || has(self.trainer.hfTokenSecretRef)",
             HF_EXPORT_TOKEN, ".promote.exports",
             lambda spec: not hub_exports(spec) or "hfTokenSecretRef" in spec["trainer"], local=False),
        *_promote_rules(),
    ]


def names_rules() -> list[Rule]:
    """What the stages name: self = the spec (Python: with its matrices expanded, where a stage may name one
    variant)."""
    never_trains = [m for m, info in METHODS.items() if not info.trains]
    at_least_one = f"at least one training stage ({', '.join(training_methods())}) is required"
    return [
        Rule("self.stages.exists(s, " + " && ".join(f"s.method != '{m}'" for m in never_trains) + ")",
             at_least_one, ".stages",
             lambda spec: any(s["method"] not in never_trains for s in spec["stages"]) or [
                 (".stages", f"{at_least_one}; got {', '.join(s['method'] for s in spec['stages'])}")]),
        # Two-variable comprehensions (index, value) keep the cost bounded; map() would not.
        Rule("self.stages.all(i, s, !has(s.from) || self.stages.exists(j, t, j < i && t.name == s.from))",
             "stages[].from must name an earlier stage", ".stages",
             lambda spec: _each_stage(spec, lambda i, s, earlier: _earlier(
                 f".stages[{i}].from", s.get("from"), "stages[].from must name an earlier stage", _names(earlier),
                 "none (the first stage starts from spec.model)"))),
        Rule("self.stages.all(i, s, !has(s.eval) || !has(s.eval.reference) || "
             "self.stages.exists(j, t, j < i && t.name == s.eval.reference))",
             "stages[].eval.reference must name an earlier stage", ".stages",
             lambda spec: _each_stage(spec, lambda i, s, earlier: _earlier(
                 f".stages[{i}].eval.reference", _get(s, "eval.reference"),
                 "stages[].eval.reference must name an earlier stage", _names(earlier)))),
        Rule("self.stages.all(i, s, !has(s.eval) || !has(s.eval.rewardModel) || "
             "self.stages.exists(j, t, j < i && t.name == s.eval.rewardModel && t.method == 'reward'))",
             f"stages[].eval.rewardModel {REWARD_STAGE_MESSAGE}", ".stages",
             lambda spec: _each_stage(spec, lambda i, s, earlier: _reward_stage(
                 f".stages[{i}].eval.rewardModel", _get(s, "eval.rewardModel"), earlier))),
        _rewards_model_rule(),
        _eval_data_stage_rule(),
        _stage_dataset_rule(),
    ]


def spec_rules() -> list[Rule]:
    """self = the spec: every rule above, in the CRD's order."""
    ship = ship_rules()
    return [*ship[:3], *names_rules(), *ship[3:]]


def storage_rules() -> list[Rule]:
    """self = spec.storage."""
    return [Rule("has(self.claimName) != has(self.volumeClaimTemplate)",
                 "storage: set exactly one of claimName or volumeClaimTemplate", "",
                 lambda st: ("claimName" in st) != ("volumeClaimTemplate" in st))]
