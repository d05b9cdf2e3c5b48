"""Cross-field checks, in Python, for `alignctl validate` and the operator.

The same rules are CEL `x-kubernetes-validations` on the models in spec.py, so the API server
refuses what these refuse; tests/manifests/bad/ holds manifests both must reject. Field-level
checks (types, ranges, enums, unknown fields) come from pydantic and the schema.
"""

from __future__ import annotations

from alignment_trainer.recipe import (METHODS, label_smoothing_problem, loss_type_problem, output_kind, reads_outputs,
                                      training_methods)

from . import admission
from .spec import REWARD_STAGE_MESSAGE, AlignmentRunSpec, StageSpec, data_stage_message, regex_problem


def _reward_problems(at: str, section: str, rewards, reward_stages: list[str]) -> list[str]:
    out = []
    for k, r in enumerate(rewards):
        problem = regex_problem(r.pattern) if r.pattern is not None else None
        if problem:
            out.append(f"{at}.{section}.rewards[{k}].pattern: {r.pattern!r} {problem}")
        if r.kind in ("regex", "format"):
            if not r.pattern:
                out.append(f"{at}.{section}.rewards[{k}].pattern: a {r.kind} reward needs a pattern (a Python regex)")
        if r.kind == "judge" and r.judge is None:
            out.append(f"{at}.{section}.rewards[{k}].judge: a judge reward needs judge (baseUrl, model, apiKeySecretRef)")
        if r.reward_model is not None and r.reward_model not in reward_stages:
            out.append(f"{at}.{section}.rewards[{k}].rewardModel: {r.reward_model!r} {REWARD_STAGE_MESSAGE}; "
                       f"accepted: {', '.join(reward_stages) or 'none (add a stage with method reward)'}")
    return out


def stage_kind(stage: StageSpec) -> str | None:
    """What kind of dataset a stage writes (recipe.output_kind), None if it writes none."""
    return output_kind(stage.method, stage.label.feedback if stage.label else None)


def _dataset_stage_problems(at: str, stage: StageSpec, earlier_stages: list[StageSpec]) -> list[str]:
    """datasets[].stage / testDatasets[].stage name an earlier stage whose output the method reads;
    the eval section's datasets may name any earlier data stage."""
    out = []
    wanted = reads_outputs(stage.method)
    readable = [s.name for s in earlier_stages if stage_kind(s) in wanted]
    for field, sources in (("datasets", stage.datasets), ("testDatasets", stage.test_datasets)):
        for k, d in enumerate(sources):
            if d.stage is not None and d.stage not in readable:
                what = (f"method {stage.method} reads no stage's output (give a source)" if not wanted else
                        f"must name an earlier stage whose output the method reads (method {stage.method} reads "
                        f"{' or '.join(wanted)} data)")
                out.append(f"{at}.{field}[{k}].stage: {d.stage!r} {what}; accepted: "
                           f"{', '.join(readable) or 'none'}")
    if stage.eval is not None:
        data_stages = [s.name for s in earlier_stages if stage_kind(s)]
        e = stage.eval
        named = [("eval.prompts", e.prompts)]
        if e.alpaca_eval:
            named += [("eval.alpacaEval.referenceOutputs", e.alpaca_eval.reference_outputs),
                      ("eval.alpacaEval.prompts", e.alpaca_eval.prompts)]
        if e.mt_bench:
            named.append(("eval.mtBench.questions", e.mt_bench.questions))
        for field, d in named:
            if d is not None and d.stage is not None and d.stage not in data_stages:
                out.append(f"{at}.{field}.stage: {d.stage!r} {data_stage_message()}; accepted: "
                           f"{', '.join(data_stages) or 'none'}")
    return out


def _stage_problems(i: int, stage: StageSpec, earlier: list[str], reward_stages: list[str] = (),
                    earlier_stages: list[StageSpec] = ()) -> list[str]:
    at = f"spec.stages[{i}]"
    out = []
    if stage.name in earlier:
        out.append(f"{at}.name: {stage.name!r} is already the name of stage "
                   f"{earlier.index(stage.name)}; stage names must be unique")
    if stage.from_ is not None and stage.from_ not in earlier:
        accepted = ", ".join(dict.fromkeys(earlier)) or "none (the first stage starts from spec.model)"
        out.append(f"{at}.from: {stage.from_!r}: stages[].from must name an earlier stage; accepted: {accepted}")
    if (METHODS[stage.method].trains or METHODS[stage.method].writes) and not stage.datasets:
        out.append(f"{at}.datasets: method {stage.method!r} needs at least one dataset")
    if stage.test_datasets and stage.test_split_size is not None:
        out.append(f"{at}.testSplitSize: give testDatasets or testSplitSize, not both")
    size = stage.test_split_size
    if size is not None and size >= 1 and size != int(size):
        out.append(f"{at}.testSplitSize: {size} must be a fraction below 1 or a whole number of rows")
    t = stage.training
    if t.max_prompt_length is not None and t.max_prompt_length >= t.max_length:
        out.append(f"{at}.training.maxPromptLength: {t.max_prompt_length} must be below "
                   f"training.maxLength ({t.max_length})")
    problem = loss_type_problem(stage.method, t.loss_type)
    if problem:
        out.append(f"{at}.training.lossType: {problem}")
    problem = None if problem else label_smoothing_problem(stage.method, t.loss_type, t.label_smoothing, "lossType")
    if problem:
        out.append(f"{at}.training.labelSmoothing: {problem}")
    if stage.lora and stage.lora.quantization != "none" and stage.resources.gpus_per_node == 0:
        out.append(f"{at}.lora.quantization: {stage.lora.quantization!r} needs GPUs "
                   f"(resources.gpusPerNode > 0); use 'none' on CPU")
    if stage.method == "grpo" and stage.grpo is None:
        out.append(f"{at}.grpo: method grpo needs a grpo section with rewards")
    if stage.method == "label" and stage.label is None:
        out.append(f"{at}.label: method label needs a label section with rewards")
    out += _reward_problems(at, "grpo", stage.grpo.rewards if stage.grpo else [], list(reward_stages))
    out += _reward_problems(at, "label", stage.label.rewards if stage.label else [], list(reward_stages))
    out += _reward_problems(at, "eval", stage.eval.rewards if stage.eval else [], list(reward_stages))
    if stage.eval is not None and stage.eval.rewards and stage.eval.prompts is None:
        out.append(f"{at}.eval.prompts: eval.rewards score the answers to a prompt set; set eval.prompts (prompts "
                   "with the reference columns the rewards read)")
    out += _dataset_stage_problems(at, stage, list(earlier_stages))
    if stage.eval is not None:
        if "judge" in stage.eval.metrics and stage.eval.judge is None:
            out.append(f"{at}.eval.judge: eval.metrics includes judge but no judge is configured")
        rm = stage.eval.reward_model
        rewards = list(reward_stages)
        if rm is not None and rm not in rewards:
            out.append(f"{at}.eval.rewardModel: {rm!r} {REWARD_STAGE_MESSAGE}; accepted: "
                       f"{', '.join(rewards) or 'none (add a stage with method reward)'}")
        graded = [name for name, section in (("alpacaEval", stage.eval.alpaca_eval), ("mtBench", stage.eval.mt_bench))
                  if section is not None]
        if graded and stage.eval.judge is None:
            out.append(f"{at}.eval.judge: eval.{' and eval.'.join(graded)} need an LLM judge; set eval.judge")
        ref = stage.eval.reference
        if ref is not None and ref not in earlier:
            out.append(f"{at}.eval.reference: {ref!r}: stages[].eval.reference must name an earlier stage; accepted: "
                       f"{', '.join(earlier) or 'none'}")
    return out


def cross_field_problems(spec: AlignmentRunSpec) -> list[str]:
    problems: list[str] = []
    earlier: list[str] = []
    for i, stage in enumerate(spec.stages):
        problems += _stage_problems(i, stage, earlier, [s.name for s in spec.stages[:i] if s.method == "reward"],
                                    spec.stages[:i])
        earlier.append(stage.name)
    if not any(METHODS[s.method].trains for s in spec.stages):
        methods = ", ".join(s.method for s in spec.stages)
        problems.append(f"spec.stages: at least one training stage ({', '.join(training_methods())}) is required; "
                        f"got {methods}")
    st = spec.storage
    if (st.claim_name is None) == (st.volume_claim_template is None):
        problems.append("spec.storage: set exactly one of claimName or volumeClaimTemplate")
    return problems + admission.problems(spec)
